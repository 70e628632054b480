"""`eggroll train llm` on a tiny random checkpoint saved locally: runs, logs, resumes exactly."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("tokenizers")

from eggroll.checkpoint import load_checkpoint
from eggroll.models import hf
from eggroll.models import transformer as tfm
from eggroll.recipes import llm

CHARS = list("0123456789+-*/() <>,.:=answerUsingthembcqkfloyxdpEGiv")


def save_tiny_checkpoint(d) -> str:
    """A tiny random Qwen2-style checkpoint with a character tokenizer, saved in directory d."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys(CHARS))}, "<unk>": len(CHARS) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    cfg = tfm.TransformerConfig(vocab_size=len(vocab), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=32, max_position=512, qkv_bias=True)
    hf.save_pretrained(str(d), tfm.init_params(jax.random.PRNGKey(0), cfg, std=0.3), cfg)
    return str(d)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _cfg(tiny_ckpt, run_dir, **kw):
    base = {"model": tiny_ckpt, "task": "countdown", "strategy": "eggroll", "generations": 2, "prompts": 2,
            "population": 4, "max_new_tokens": 6, "max_prompt_tokens": 16, "eval_every": 1, "eval_problems": 4,
            "checkpoint_every": 1, "sigma": 0.05, "lr": 0.01, "run_dir": str(run_dir), "progress": False,
            "template": "{numbers_csv}={target}:"}
    return llm.Config(**{**base, **kw})


def test_llm_eggroll_one_step_logs_diagnostics(tiny_ckpt, tmp_path):
    res = llm.run(_cfg(tiny_ckpt, tmp_path / "one", generations=1))
    assert res["steps"] == res["generations"] == 1 and 0 <= res["val_accuracy"] <= 1
    recs = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert {"no_signal_frac", "truncation_rate", "distinct_answers", "mean_reward", "val_accuracy",
            "prompts_truncated"} <= set(recs[-1])
    assert (tmp_path / "one" / "checkpoint" / "arrays.safetensors").exists()
    assert json.loads((tmp_path / "one" / "result.json").read_text())["strategy"] == "eggroll"
    # what crosses processes per step (none here: one process): the all-gathered rewards
    assert res["communication"]["comm_bytes_per_process"] == 0


@pytest.mark.slow
def test_llm_eggroll_resumes_exactly(tiny_ckpt, tmp_path):
    full = llm.run(_cfg(tiny_ckpt, tmp_path / "full"))
    assert full["steps"] == 2
    llm.run(_cfg(tiny_ckpt, tmp_path / "part", generations=1))
    llm.run(_cfg(tiny_ckpt, tmp_path / "part", generations=2, resume=True))
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint", _template(tiny_ckpt))
    b, meta = load_checkpoint(tmp_path / "part" / "checkpoint", _template(tiny_ckpt))
    assert meta["generation"] == 2
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="cannot resume"):
        llm.run(_cfg(tiny_ckpt, tmp_path / "part", generations=3, sigma=0.1, resume=True))


def _template(tiny_ckpt):
    return llm.make_train(_cfg(tiny_ckpt, "unused")).init()


@pytest.mark.slow
def test_llm_grpo_runs_and_exports(tiny_ckpt, tmp_path):
    res = llm.run(_cfg(tiny_ckpt, tmp_path / "g", strategy="grpo", group_size=2, export=True, kl_coef=0.1))
    assert res["steps"] == 2 and res["communication"]["optimizer_steps"] == 1  # data parallel on 4 devices
    back = hf.load_pretrained(str(tmp_path / "g" / "hf"))
    assert back.cfg.hidden_size == 16


def test_llm_config_errors(tiny_ckpt):
    with pytest.raises(ValueError, match="--model"):
        llm.validate(llm.Config())
    with pytest.raises(ValueError, match="countdown_numbers"):
        llm.validate(llm.Config(model="x", countdown_numbers="3"))


@pytest.mark.slow
def test_llm_train_params_measures_and_errors(tiny_ckpt, tmp_path):
    """--train-params all (vectors included), bfloat16 compute, anchored decay; result.json has
    the drift, the held-out text loss before / after and Pass@K; bad groups are one-line errors."""
    text = tmp_path / "heldout.txt"
    text.write_text("1+2=3\n\n4*5=20, 6-1=5\n")
    res = llm.run(_cfg(tiny_ckpt, tmp_path / "m", generations=1, train_params="all", compute_dtype="bfloat16",
                       anchor_decay=0.01, heldout_text=str(text), pass_k=2))
    m = res["measures"]
    assert {"drift_norm", "drift_rel", "heldout_nll", "heldout_nll_start", "pass@1", "pass@2"} <= set(m)
    assert m["pass@1"] <= m["pass@2"] and m["heldout_nll"] > 0


def test_llm_new_flag_errors(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown parameter group"):
        llm.validate(llm.Config(model="x", train_params="matrices,heads"))
    with pytest.raises(ValueError, match="anchor_decay"):
        llm.validate(llm.Config(model="x", anchor_decay=1.0))
    with pytest.raises(FileNotFoundError, match="heldout-text"):
        llm.make_train(_cfg(tiny_ckpt, tmp_path / "x", heldout_text=str(tmp_path / "missing.txt")))
