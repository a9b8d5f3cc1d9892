"""Exports that serving stacks accept: generation_config.json (end / pad ids and the run's sampling), the
chat template, file modes like the other files, export.dtype, config.json keys that transformers 4.x and
vLLM read as well as transformers 5, and export.push_to_hub skipped with a message when offline."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from pf_jax.config import load_config
from pf_jax.config.recipe import TrainConfig
from pf_jax.data.chat_render import named_chat_template
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.hf_io import export_hf_directory, load_hf_directory
from pf_jax.training.trainer import Trainer
from tests.chat_fixtures import qwen_tokenizer, tiny_export

LLAMA3_ROPE = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
               ("original_max_position_embeddings", 256))
CONFIGS = {
    "llama3": ModelConfig.tiny("llama", vocab_size=64, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "qwen2": ModelConfig.tiny("qwen2", vocab_size=64, rope_theta=1000000.0),
    "gemma3": ModelConfig.tiny("gemma3", vocab_size=64),
}


@pytest.fixture(scope="module")
def run_export(tmp_path_factory):
    """A one-step GRPO run on a tiny model with Qwen2.5's chat template, exported in bfloat16."""
    root = tmp_path_factory.mktemp("serving")
    model_dir = tiny_export(root / "base", qwen_tokenizer())
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    cfg = load_config(TrainConfig, None, [
        f"model.name={model_dir}", "method.name=grpo", "reward.name=entropy", f"data.source={rows}", "steps=1",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
        "rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.stop=[\"\\n\\n\"]", "export.dtype=bfloat16",
        "export.push_to_hub=someone/tiny-grpo", "eval.enabled=false", "logging.tensorboard=false",
        "logging.plots=false", "logging.progress_bar=false", f"logging.runs_dir={root}", "logging.run_name=r"])
    result = Trainer(cfg).run()
    return result.export_dir


def test_generation_config_has_the_end_ids_and_the_runs_sampling(run_export):
    from transformers import GenerationConfig

    tokenizer = qwen_tokenizer()
    gen = GenerationConfig.from_pretrained(run_export)
    assert gen.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.max_new_tokens) == (True, 0.7, 0.9, 4)
    assert gen.stop_strings == ["\n\n"]


def test_the_chat_template_travels_with_the_tokenizer(run_export):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run_export).chat_template == named_chat_template("qwen2.5")


def test_weights_in_export_dtype_with_the_modes_of_the_other_files(run_export):
    config = json.loads((run_export / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(str(run_export / "model.safetensors"), "np") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_export.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    assert load_hf_directory(run_export).cfg.vocab_size == len(qwen_tokenizer())  # SHA256SUMS verified too


def test_push_to_hub_is_skipped_offline_with_a_message(run_export, capsys):
    from pf_jax.training.export_files import push_to_hub

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert push_to_hub(run_export, "someone/tiny-grpo") is None
    assert "export.push_to_hub=someone/tiny-grpo: skipped, the Hugging Face hub is offline" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_has_the_keys_transformers_4_and_vllm_read(tmp_path, name):
    cfg = CONFIGS[name]
    export_hf_directory(Decoder(cfg, rngs=nnx.Rngs(0)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == cfg.rope_theta and config["torch_dtype"] == "float32"
    if name == "llama3":
        assert config["rope_scaling"] == dict(LLAMA3_ROPE)
    else:
        assert config["rope_scaling"] is None
    if name == "gemma3":
        assert config["rope_local_base_freq"] == cfg.rope_local_theta
    assert load_hf_directory(tmp_path).cfg == cfg  # and it still reads back as the same model


TRANSFORMERS4 = os.environ.get("PF_JAX_TRANSFORMERS4")  # a --target directory with transformers 4.57 installed
LOGITS_IN_TRANSFORMERS4 = """
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(ids).logits[0].tolist()
print(json.dumps({"version": transformers.__version__, "rope_theta": config.rope_theta,
                  "rope_scaling": config.rope_scaling, "logits": logits}))
"""


@pytest.mark.skipif(TRANSFORMERS4 is None, reason="set PF_JAX_TRANSFORMERS4 to a directory holding transformers 4.57 "
                                                  "(pip install --target DIR transformers==4.57.1 'huggingface_hub<1' "
                                                  "'tokenizers<0.23' --no-deps)")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_4_57_reads_the_export_as_the_same_model(tmp_path, name):
    cfg = CONFIGS[name]
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    export_hf_directory(model, tmp_path)
    ids = list(range(3, 40))  # long enough for the sliding layers and the llama3 scaled frequencies to matter
    env = {**os.environ, "PYTHONPATH": TRANSFORMERS4}
    proc = subprocess.run([sys.executable, "-c", LOGITS_IN_TRANSFORMERS4, str(tmp_path), json.dumps(ids)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.splitlines()[-1])
    assert theirs["version"].startswith("4.57") and theirs["rope_theta"] == cfg.rope_theta
    if name == "llama3":
        assert theirs["rope_scaling"]["rope_type"] == "llama3" and theirs["rope_scaling"]["factor"] == 8.0
    tokens = jax.numpy.asarray([ids])
    hidden, _ = model(tokens, jax.numpy.arange(len(ids))[None])
    ours = np.asarray(model.logits(hidden))[0]
    np.testing.assert_allclose(np.asarray(theirs["logits"]), ours, atol=2e-4)
