"""Parameter groups: EGGROLL and GRPO can train the same set (--train-params); the tied head;
clear errors for unknown or absent groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eggroll import noise as nz
from eggroll.baselines.grpo import grpo_finetuner
from eggroll.models import transformer as tfm
from eggroll.tasks.char_tokenizer import CharTokenizer
from eggroll.tasks.finetune import es_finetuner
from eggroll.tasks.param_groups import (GROUPS, check_groups, group_kinds, group_mask, llm_kinds, masked_optimizer,
                                        parse_groups)
from eggroll.tasks.reasoning import custom_task


def _cfg(tied):
    return tfm.TransformerConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                 num_kv_heads=1, head_dim=8, intermediate_size=32, max_position=64,
                                 tie_embeddings=tied, qkv_bias=True)


def _by_name(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parse_and_check_groups():
    assert parse_groups("all") == frozenset(GROUPS) and parse_groups("matrices, head") == {"matrices", "head"}
    with pytest.raises(ValueError, match="unknown parameter group.*heads"):
        parse_groups("matrices,heads")
    params = tfm.init_params(jax.random.PRNGKey(0), _cfg(False))
    check_groups(params, GROUPS)  # a transformer has all four
    with pytest.raises(ValueError, match="no embeddings, vectors parameters"):
        check_groups({"w": jnp.zeros((2, 3))}, {"matrices", "embeddings", "vectors"})


@pytest.mark.parametrize("tied", [False, True])
def test_group_kinds_and_mask_select_the_same_leaves(tied):
    params = tfm.init_params(jax.random.PRNGKey(0), _cfg(tied))
    for spec in ("all", "matrices", "head", "vectors,embeddings"):
        groups = parse_groups(spec)
        kinds, mask = _by_name(group_kinds(params, groups)), _by_name(group_mask(params, groups))
        assert kinds.keys() == mask.keys()
        for name, kind in kinds.items():
            assert (kind != nz.FROZEN) == mask[name], (spec, name)
            if mask[name]:
                assert kind == (nz.FULL if params_ndim(params, name) == 1 else nz.LOWRANK)
    embed = "['model']['embed_tokens']['weight']"
    head_mask = _by_name(group_mask(params, {"head"}))
    assert head_mask[embed] == tied  # tied: the head IS the embedding table
    if not tied:
        assert head_mask["['lm_head']['weight']"]


def params_ndim(params, name):
    return _by_name(params)[name].ndim


def test_llm_kinds_perturb_head_on_a_tied_model_perturbs_the_embedding():
    kind = llm_kinds(head=True, tied=True)
    assert kind("model.embed_tokens.weight", jnp.zeros((5, 4))) == nz.LOWRANK
    assert llm_kinds(head=True)("model.embed_tokens.weight", jnp.zeros((5, 4))) == nz.FROZEN
    assert llm_kinds(head=True)("lm_head.weight", jnp.zeros((5, 4))) == nz.LOWRANK


def _sevens(text, ex):
    return text.count("7") / 4


def test_es_and_grpo_train_only_the_selected_groups():
    cfg = _cfg(False)
    params = tfm.init_params(jax.random.PRNGKey(0), cfg, std=0.3)
    task = custom_task(_sevens, [{"question": "1 2>3:"}, {"question": "4 5>9:"}])
    tok, groups = CharTokenizer(), parse_groups("matrices,vectors")
    es = es_finetuner(cfg, tok, task, optax.sgd(0.5), population=8, sigma=0.3, prompt_len=6, max_new_tokens=4,
                      kinds=group_kinds(params, groups))
    ctx = es.setup(jax.random.PRNGKey(1), params)
    es_new, m = es.step(ctx, es.init(ctx, params), task.examples)
    task = custom_task(lambda text, ex: len(set(text)) / 4, task.examples)  # varies within a sampled group
    gr = grpo_finetuner(cfg, tok, task, masked_optimizer(optax.adam(1e-2), group_mask(params, groups)), group_size=4,
                        prompt_len=6, max_new_tokens=4)
    g_new, gm = gr.step(gr.init(jax.random.PRNGKey(2), params), task.examples)
    assert gm["no_signal_frac"] < 1
    mask, before = _by_name(group_mask(params, groups)), _by_name(params)
    assert m["no_signal_frac"] < 1  # the ES step had a signal
    for new in (_by_name(es_new.params), _by_name(g_new.params)):
        for name, trained in mask.items():
            same = bool(jnp.array_equal(new[name], before[name]))
            assert same != trained, name
    assert np.isfinite(m["update_norm"])
