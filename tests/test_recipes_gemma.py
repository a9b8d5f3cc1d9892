"""The ready recipes: every shipped recipe fits its method, the hub variants plan offline, and the
conversational SFT recipe runs as written on the embedded Gemma 3 270M (the GRPO, DPO, KTO and online DPO
recipes' two-step runs are measured smoke runs, their figures in each header)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pf_jax.config import load_config
from pf_jax.config.recipe import CONFIGS_DIR, TrainConfig
from pf_jax.methods.compose import check_recipe

REPO = Path(__file__).resolve().parents[1]
GEMMA_RECIPES = ["sft/gemma3-270m-chat.yaml", "grpo/gemma3-270m-math.yaml", "preference/dpo-gemma3-270m-chat.yaml",
                 "preference/kto-gemma3-270m-chat.yaml", "preference/online-dpo-gemma3-270m-math.yaml"]


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(CONFIGS_DIR)) for p in CONFIGS_DIR.rglob("*.yaml")
                                          if p.name != "common.yaml"))
def test_every_shipped_recipe_fits_its_method(recipe):
    check_recipe(load_config(TrainConfig, CONFIGS_DIR / recipe))


@pytest.mark.parametrize("recipe", GEMMA_RECIPES)
def test_each_gemma_recipe_has_its_measured_header_and_a_hub_variant(recipe):
    header = (CONFIGS_DIR / recipe).read_text()
    assert "command:" in header and "needs:" in header and "measured: `--config ... steps=2` took" in header
    path = CONFIGS_DIR / recipe
    variant = path.with_name(path.name.replace("gemma3-270m", "qwen2.5-0.5b-instruct"))
    assert load_config(TrainConfig, variant).model.name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_hub_variant_plans_offline():
    proc = subprocess.run([sys.executable, "-m", "pf_jax.train", "--config", "configs/sft/qwen2.5-0.5b-instruct-chat.yaml",
                           "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "policy parameters: 494,032,768" in proc.stdout  # Qwen2.5-0.5B's published count


@pytest.mark.slow
def test_the_conversational_sft_recipe_runs_as_written(tmp_path, monkeypatch):
    from pf_jax.training.trainer import Trainer

    monkeypatch.chdir(REPO)  # the recipe names its data relative to the checkout
    cfg = load_config(TrainConfig, CONFIGS_DIR / "sft/gemma3-270m-chat.yaml",
                      ["steps=1", "export=false", f"logging.runs_dir={tmp_path}", "logging.progress_bar=false"])
    trainer = Trainer(cfg)
    batch, _ = trainer.make_batch(trainer.prompts.next_batch(), 0)
    seq = batch.seq
    targets = np.asarray(seq.response_tokens)[np.asarray(seq.loss_mask)]
    assert seq.segment_ids is not None and int(np.asarray(seq.segment_ids).max()) >= 2  # packed
    assert (targets == 106).sum() >= 8 and 1 not in targets  # each turn ends with <end_of_turn>, never <eos>
    result = trainer.run()
    assert result.completed and np.isfinite(result.summary["loss"]["last"])
