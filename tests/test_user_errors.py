"""Every user mistake of the reliability probe (issue 24) is one line and exit code 2, never a traceback.

Each case runs a CLI in this process through its `main(argv)` (train, generate) or `cli(argv)` (eval) and
asserts the exit code, that stderr holds exactly one `pf_jax.<cli>: ...` line with the case's key words,
and that no traceback was printed. Recipes are tiny (one layer of width 32, one or two steps).
"""

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from pf_jax.data.codec import CharCodec
from pf_jax.models.config import ModelConfig
from pf_jax.models.decoder import Decoder
from pf_jax.models.hf_io import export_hf_directory
from tests.test_resume import RECIPE

TRACEBACK = "Traceback (most recent call last)"
TINY = [  # over configs/default.yaml and test_resume's tiny recipe: one step, no export, no monitor reward
    *RECIPE, "steps=1", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.minibatches=1",
    "rollout.updates_per_batch=1", "export=false", "logging.run_name=r", "method.loss={}", "reward.name=null",
    "optimizer.group_lr={}", "checkpoint.every_steps=100",
]


def one_line_exit_2(capsys, prog: str, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert TRACEBACK not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def train_fails(capsys, tmp_path: Path, overrides: list[str], *words: str) -> str:
    from pf_jax.train import main

    code = main([*TINY, f"logging.runs_dir={tmp_path / 'runs'}", *overrides])
    return one_line_exit_2(capsys, "pf_jax.train", code, *words)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- config and command line ---------------------------------------------------------------------------

CONFIG_CASES = {
    "unknown-key": (["trainer.lr=1"], ["unknown config key 'trainer.lr'"]),
    "misspelt-method-name": (["method.name=grop"], ["unknown method 'grop'", "did you mean 'grpo'"]),
    "lr-overflows-float32": (["optimizer.lr=1e39"], ["optimizer.lr", "less than or equal to 10"]),
    "lr-inf": (["optimizer.lr=.inf"], ["optimizer.lr", "finite number"]),
    "lr-nan": (["optimizer.lr=.nan"], ["optimizer.lr", "finite number"]),
    "lr-absurd": (["optimizer.lr=50"], ["optimizer.lr", "less than or equal to 10"]),
    "group-lr-inf": (["optimizer.group_lr={log_z: .inf}"], ["optimizer.group_lr.log_z", "finite number"]),
    "alpha-overflows-float32": (["method.alpha=1e39"], ["method.alpha", "does not fit in float32"]),
    "nan-in-loss-kwargs": (["method.loss={clip_low: .nan}"], ["method.loss", "not a finite number", "clip_low"]),
    "reward-scale-overflows": (["reward.scale=-1e40"], ["reward.scale", "does not fit in float32"]),
    "run-name-escapes-runs-dir": (["logging.run_name=.."], ["logging.run_name", "inside runs_dir"]),
    "run-name-with-slash": (["logging.run_name=a/b"], ["logging.run_name", "pattern"]),
    "grpo-one-sample": (["method.name=grpo", "reward.name=arithmetic", "rollout.samples_per_prompt=1"],
                        ["rollout.samples_per_prompt=1", "nothing would be learned", ">= 2"]),
    "rloo-one-sample": (["method.name=rloo", "reward.name=arithmetic", "rollout.samples_per_prompt=1"],
                        ["rloo_advantages", "rollout.samples_per_prompt >= 2"]),
    "method-needs-reward": (["method.name=grpo"], ["needs a reward", "reward.name"]),
    "malformed-override": (["steps"], ["not of the form key.sub=value"]),
    "unknown-option": (["--lr", "1"], ["unknown option '--lr'"]),
    "topology-without-dry-run": (["--topology", "v5e:2x2"], ["--topology and --json go with --dry-run"]),
    "missing-recipe-file": (["--config", "/nonexistent/recipe.yaml"], ["cannot read config file"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_and_cli_mistakes(capsys, tmp_path, case):
    overrides, words = CONFIG_CASES[case]
    train_fails(capsys, tmp_path, overrides, *words)


def test_duplicate_yaml_key_names_the_key_the_lines_and_the_file(capsys, tmp_path):
    recipe = write(tmp_path / "dup.yaml", "steps: 3\nseed: 1\nsteps: 500\n")
    line = train_fails(capsys, tmp_path, ["--config", str(recipe)], "key 'steps' is given twice", "lines 1 and 3")
    assert str(recipe) in line


def test_invalid_yaml_names_the_file(capsys, tmp_path):
    recipe = write(tmp_path / "bad.yaml", "steps: [1, 2\n")
    train_fails(capsys, tmp_path, ["--config", str(recipe)], str(recipe), "not valid YAML")


def test_misspelt_key_under_method_loss_names_the_nearest_argument(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["method.name=grpo", "reward.name=arithmetic", "method.loss.clip_lo=0.1"],
                "method.loss", "'clip_lo'", "clip_low")


def test_minibatches_that_do_not_divide_the_batch(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["rollout.minibatches=3"], "rollout.minibatches=3", "does not divide the 4")


def test_mesh_that_does_not_fit_one_device(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["mesh.data=3"], "mesh (data=3", "1 devices")


def test_prompt_longer_than_the_model_context(capsys, tmp_path):
    """3,003 tokens for a model whose context is 512, let through by max_prompt_tokens=5000."""
    rows = write(tmp_path / "long.jsonl", json.dumps({"prompt": "1+2=" * 750 + "12", "answer": 3}) + "\n")
    train_fails(capsys, tmp_path, [f"data.source={rows}", "data.max_prompt_tokens=5000"],
                "has 3003 tokens", "context of 512 tokens", "data.max_prompt_tokens=5000")


def test_every_step_skipped_stops_without_exporting(capsys, tmp_path):
    """alpha=1e38 fits float32 but makes the target log R = alpha log p overflow: every update is skipped."""
    line = train_fails(capsys, tmp_path, ["method.alpha=1e38", "steps=2", "export=true"],
                       "every update of steps 1-2 was skipped", "the loss is", "stopped before exporting")
    assert "max_consecutive_skips" in line
    assert not (tmp_path / "runs" / "r" / "export").exists()


def test_max_consecutive_skips_stops_before_the_last_step(capsys, tmp_path):
    train_fails(capsys, tmp_path, ["method.alpha=1e38", "steps=5", "training.max_consecutive_skips=2"],
                "every update of steps 1-2 was skipped", "2 steps in a row")
    saved = sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["2"]  # what it had is saved: a rerun with the cause fixed resumes there


# --- run directory ---------------------------------------------------------------------------------------

def test_runs_dir_that_cannot_be_written(capsys, tmp_path):
    blocker = write(tmp_path / "not-a-dir", "a file where the runs directory should be")
    line = train_fails(capsys, tmp_path, [f"logging.runs_dir={blocker}"], "cannot write to", "Not a directory")
    assert str(blocker) in line


def test_export_dir_that_cannot_be_written(capsys, tmp_path):
    write(tmp_path / "runs" / "r" / "export", "a file where the export directory should be")
    train_fails(capsys, tmp_path, ["export=true"], "cannot write the exported weights to", "export")


def test_checkpoint_dir_that_cannot_be_written(capsys, tmp_path):
    blocker = write(tmp_path / "blocker", "x")
    train_fails(capsys, tmp_path, [f"checkpoint.dir={blocker / 'ckpt'}"], str(blocker / "ckpt"), "Not a directory")


# --- data files ------------------------------------------------------------------------------------------

GOOD_ROW = json.dumps({"prompt": "1+1=", "answer": 2}) + "\n"


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


DATA_CASES: dict[str, tuple[Callable[[Path], Path], list[str], list[str]]] = {
    "not-json-line": (lambda d: write(d / "rows.jsonl", GOOD_ROW + "{not json\n"), ["data.on_bad_row=stop"],
                      ["bad row 1", "rows.jsonl", "not valid JSON", "data.on_bad_row=skip"]),
    "wrong-type": (lambda d: write(d / "rows.jsonl", GOOD_ROW + json.dumps({"prompt": 5, "answer": 1}) + "\n"),
                   ["data.on_bad_row=stop"], ["bad row 1", "field 'prompt' must be a string"]),
    "empty-file": (lambda d: write(d / "rows.jsonl", ""), [], ["no valid rows", "rows.jsonl", "kept 0 of 0"]),
    "non-utf8-byte": (lambda d: write(d / "rows.jsonl", GOOD_ROW.encode() + b'{"prompt": "1+\xff=", "answer": 1}\n'),
                      ["data.on_bad_row=stop"], ["bad row 1", "byte 0xff at column 15 is not UTF-8"]),
    "non-utf8-only-row": (lambda d: write(d / "rows.jsonl", b'{"prompt": "\xfe"}\n'), [],
                          ["no valid rows", "row 0: byte 0xfe", "not UTF-8"]),
    "non-utf8-json-array": (lambda d: write(d / "rows.json", b'[{"prompt": "a",\n "answer": "\xff"}]'), [],
                            ["rows.json", "is not UTF-8", "byte 0xff", "line 2"]),
    "parquet-wrong-schema": (lambda d: _parquet(d / "rows.parquet", {"question": ["1+1="], "solution": ["2"]}), [],
                             ["no valid rows", "missing field 'prompt'"]),
    "parquet-not-parquet": (lambda d: write(d / "rows.parquet", "this is not a parquet file"), [],
                            ["rows.parquet", "not a readable parquet file"]),
    "missing-file": (lambda d: d / "absent.jsonl", [], ["cannot read data file", "absent.jsonl", "No such file"]),
    "unsupported-suffix": (lambda d: write(d / "rows.csv", "prompt,answer\n1+1=,2\n"), [],
                           ["rows.csv", "suffix '.csv'", ".jsonl"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_file_mistakes(capsys, tmp_path, case):
    make, extra, words = DATA_CASES[case]
    train_fails(capsys, tmp_path, [f"data.source={make(tmp_path / 'data')}", *extra], *words)


# --- weights ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """What the trainer exports for a tiny char-level model: config.json, model.safetensors, SHA256SUMS and
    the char tokenizer."""
    path = tmp_path_factory.mktemp("tiny_export")
    codec = CharCodec()
    cfg = ModelConfig.tiny("llama", vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=codec.bos_id,
                           eos_token_ids=codec.eos_ids, pad_token_id=codec.pad_id)
    export_hf_directory(Decoder(cfg, rngs=nnx.Rngs(0)), path)
    codec.save(path)
    return path


def _copy(tiny_export: Path, d: Path) -> Path:
    return Path(shutil.copytree(tiny_export, d / "model"))


def _edit_tensors(d: Path, edit: Callable[[dict], None], keep_digests: bool = False) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    if not keep_digests:
        (d / "SHA256SUMS").unlink()  # as a third-party directory, which has none


def _truncated(d: Path) -> None:
    (d / "SHA256SUMS").unlink()
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _config_without(key: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        del config[key]
        (d / "config.json").write_text(json.dumps(config))

    return damage


def _config_set(key: str, value) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config[key] = value
        (d / "config.json").write_text(json.dumps(config))

    return damage


def _header(d: Path, header: object) -> None:
    (d / "SHA256SUMS").unlink()
    blob = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 64)


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "SHA256SUMS").unlink()
    write(d / "pytorch_model.bin", b"not to be unpickled")


def _escaping_index(d: Path) -> None:
    (d / "SHA256SUMS").unlink()
    shutil.copy(d / "model.safetensors", d.parent / "x.safetensors")
    names = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    write(d / "model.safetensors.index.json", json.dumps({"weight_map": dict.fromkeys(names, "../x.safetensors")}))


def _flip_bytes(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # the size is kept: only the digest can tell
    (d / "model.safetensors").write_bytes(bytes(data))


def _nan_weight(tensors: dict) -> None:
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan


def _wrong_shape(tensors: dict) -> None:
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((100, 32), np.float32)


WEIGHT_CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "truncated": (_truncated, ["model.safetensors", "is truncated"]),
    "wrong-shape": (lambda d: _edit_tensors(d, _wrong_shape), ["up_proj.weight", "expected shape (64, 32)", "(100, 32)"]),
    "nan-weights": (lambda d: _edit_tensors(d, _nan_weight),
                    ["model.layers.0.mlp.up_proj.weight", "holds 1 NaN or inf value"]),
    "bytes-changed-after-export": (_flip_bytes, ["does not match its digest in SHA256SUMS", "changed after it was written"]),
    "unsupported-architecture": (_config_set("model_type", "mistral"), ["model_type 'mistral' is not supported"]),
    "config-missing-key": (_config_without("hidden_size"), ["config.json", "lacks the key 'hidden_size'"]),
    "config-wrong-type": (_config_set("num_hidden_layers", "two"), ["config.json", "wrong type"]),
    "config-not-an-object": (lambda d: write(d / "config.json", "[1, 2]"), ["config.json", "must hold a JSON object"]),
    "header-not-an-object": (lambda d: _header(d, [1, 2]), ["model.safetensors", "malformed header"]),
    "header-entry-without-offsets": (lambda d: _header(d, {"w": {"dtype": "F32", "shape": [4]}}),
                                     ["malformed header entry for tensor 'w'", "data_offsets"]),
    "pickle-only-directory": (_pickle_only, ["pytorch_model.bin", "pickle files are never loaded"]),
    "shard-outside-the-directory": (_escaping_index, ["'../x.safetensors'", "not a file inside"]),
}


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_weights_mistakes(capsys, tmp_path, tiny_export, case):
    damage, words = WEIGHT_CASES[case]
    model = _copy(tiny_export, tmp_path)
    damage(model)
    train_fails(capsys, tmp_path, [f"model.name={model}"], *words)


def test_bad_gguf_file(capsys, tmp_path):
    gguf = write(tmp_path / "model.gguf", b"GGUF" + b"\0" * 20)
    train_fails(capsys, tmp_path, [f"model.name={gguf}"], "model.gguf", "could not be read")


def test_missing_model_path(capsys, tmp_path):
    train_fails(capsys, tmp_path, [f"model.name={tmp_path / 'no-such-model'}"], "unknown model", "no-such-model")


def test_the_tiny_export_itself_loads(tiny_export, tmp_path, capsys):
    """The damage above is what fails: the same directory undamaged trains (a check that the cases can pass)."""
    from pf_jax.train import main

    assert main([*TINY, f"model.name={tiny_export}", f"logging.runs_dir={tmp_path}"]) == 0, capsys.readouterr().err


# --- rewards ---------------------------------------------------------------------------------------------

def test_nan_from_a_custom_reward_names_the_reward_and_response(capsys, tmp_path, monkeypatch):
    from pf_jax.tasks.rewards import REWARDS, RewardOutput

    def nan_reward(scale=1.0):
        def reward(rows, responses, group_ids):
            rewards = np.ones(len(responses), np.float32)
            rewards[1] = np.nan
            return RewardOutput(rewards, [None] * len(responses))

        return reward

    monkeypatch.setitem(REWARDS, "nan_reward", nan_reward)  # a user's reward, registered as users do
    train_fails(capsys, tmp_path, ["method.name=grpo", "reward.name=nan_reward"],
                "reward 'nan_reward' failed on 1 of 4 completions", "response 1", "returned nan", "reward.on_error=zero")


def test_nan_state_reward_names_the_state():
    """RewardFlow: a NaN reward would spread through the max-propagation to every predecessor."""
    from pf_jax.config.errors import UserError
    from pf_jax.rewards.state_graph import propagate_state_values

    with pytest.raises(UserError, match="state 'room-2' has reward nan"):
        propagate_state_values(np.array([0.0, 0.5, np.nan]), np.array([0, 1]), np.array([1, 2]), 0.9,
                               keys=("start", "room-1", "room-2"))


# --- generate and eval -----------------------------------------------------------------------------------

def generate_fails(capsys, argv: list[str], *words: str) -> str:
    from pf_jax.generate import main

    return one_line_exit_2(capsys, "pf_jax.generate", main(argv), *words)


def test_generate_loads_the_projects_own_tiny_export(tiny_export, capsys):
    from pf_jax.generate import main

    assert main(["--model", str(tiny_export), "--prompt", "1+2=", "-n", "2", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["sample"] for s in out["samples"]] == [0, 1]
    assert out["samples"][0]["prompt_tokens"] == CharCodec().encode_prompt("1+2=")


def test_generate_with_a_missing_model_path(capsys, tmp_path):
    generate_fails(capsys, ["--model", str(tmp_path / "gone"), "--prompt", "x"], "unknown model", "gone")


def test_generate_with_damaged_weights(capsys, tmp_path, tiny_export):
    model = _copy(tiny_export, tmp_path)
    _flip_bytes(model)
    generate_fails(capsys, ["--model", str(model), "--prompt", "1+1="], "does not match its digest")


def test_generate_chat_on_a_tokenizer_without_a_template(capsys, tiny_export):
    generate_fails(capsys, ["--model", str(tiny_export), "--prompt", "1+1=", "--chat"], "has no chat template")


def test_generate_bad_sampling_setting(capsys, tiny_export):
    generate_fails(capsys, ["--model", str(tiny_export), "--prompt", "1", "--top-p", "1.5"], "top_p")


def eval_fails(capsys, argv: list[str], *words: str) -> str:
    from pf_jax.eval import cli

    return one_line_exit_2(capsys, "pf_jax.eval", cli(argv), *words)


def test_eval_with_a_missing_model_path(capsys, tmp_path):
    eval_fails(capsys, ["--problems", "arithmetic", "--limit", "2", "--model", str(tmp_path / "gone"),
                        "--run-dir", str(tmp_path / "run")], "unknown model", "gone")


def test_eval_with_a_missing_problems_file(capsys, tmp_path):
    eval_fails(capsys, ["--problems", str(tmp_path / "absent.jsonl"), "--responses", str(tmp_path / "r.jsonl")],
               "problem file", "absent.jsonl", "does not exist")


def test_eval_with_a_template_without_the_prompt(capsys, tmp_path, tiny_export):
    eval_fails(capsys, ["--problems", "arithmetic", "--limit", "2", "--model", str(tiny_export),
                        "--template", "Q: A:", "--run-dir", str(tmp_path / "run")], "must contain '{prompt}'")


def test_eval_with_a_non_utf8_responses_file(capsys, tmp_path):
    problems = write(tmp_path / "p.jsonl", json.dumps({"id": "a", "prompt": "1+1=", "answer": 2}) + "\n")
    responses = write(tmp_path / "r.jsonl", b'{"problem_id": "a", "responses": ["\xff"]}\n')
    eval_fails(capsys, ["--problems", str(problems), "--responses", str(responses), "--run-dir", str(tmp_path / "o")],
               "r.jsonl:1", "byte 0xff", "not UTF-8")


# --- our own bugs keep their traceback -------------------------------------------------------------------

def test_an_error_that_is_not_a_user_mistake_is_not_swallowed(tmp_path, monkeypatch):
    from pf_jax.train import main
    from pf_jax.training import run

    def broken(cfg):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(run, "train", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        main([*TINY, f"logging.runs_dir={tmp_path}"])
