"""Hugging Face checkpoints <-> `models.transformer`: load Qwen2 / Qwen2.5 / Qwen3 / Llama(-3)
safetensors checkpoints, and export (evolved) weights back in the same format.

    ckpt = load_pretrained("path/to/dir")          # or a hub id such as "Qwen/Qwen2.5-0.5B"
    ckpt.params, ckpt.cfg                          # float32 pytree + TransformerConfig
    ckpt.tokenizer                                 # tokenizers.Tokenizer (tokenizer.json) or None
    ckpt.chat_template, ckpt.eos_ids               # from tokenizer_config / generation_config
    ckpt.special                                   # bos_token, eos_token, bos_id, add_bos (`special_tokens`)
    text = apply_chat_template(ckpt.chat_template, [{"role": "user", "content": "hi"}],
                               bos_token=ckpt.special["bos_token"], eos_token=ckpt.special["eos_token"])
    save_pretrained("out_dir", params, ckpt.cfg, source=ckpt.path)   # + tokenizer files copied

A directory holds config.json, model.safetensors or model-0000x-of-0000y.safetensors shards with
model.safetensors.index.json, and optionally tokenizer.json, tokenizer_config.json (chat
template, eos token) and generation_config.json (eos ids). Hub ids need `huggingface_hub`
(downloaded once into its cache: HUB_PATTERNS, chat_template.jinja included). Every tensor name, shape and the absence of extra tensors is
checked; a mismatch raises one error listing the missing / mismatched / unexpected tensors.
Tensors are read with safetensors' flax backend (bfloat16 checkpoints load), cast to `dtype`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .transformer import TransformerConfig, init_params

SUPPORTED = ("qwen2", "qwen3", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# what a hub download fetches: config, weights, tokenizer files and chat_template.jinja
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
# buffers some checkpoints carry that are not parameters
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Pretrained(NamedTuple):
    params: Any
    cfg: TransformerConfig
    tokenizer: Any  # tokenizers.Tokenizer or None
    chat_template: str | None
    eos_ids: tuple
    hf_config: dict
    path: str
    special: dict = {}  # `special_tokens`: bos_token / eos_token strings (for templates), bos_id, add_bos


# ---------------------------------------------------------------------------------------------
# config


def _rope(d: dict) -> tuple[float, tuple | None]:
    """(rope_theta, scaling) from a transformers-4 (rope_theta, rope_scaling) or
    transformers-5 (rope_parameters) config."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta, scaling = rp["rope_theta"], {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta, scaling = d.get("rope_theta", 10000.0), dict(d.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return float(theta), tuple(sorted(scaling.items()))


def config_from_hf(d: dict) -> TransformerConfig:
    """TransformerConfig from a config.json dict; clear errors for unsupported variants."""
    mt = d.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or ()):
        raise ValueError("sliding-window attention layers are not supported; use a config with "
                         "use_sliding_window false")
    heads = d["num_attention_heads"]
    theta, scaling = _rope(d)
    attn_bias = bool(d.get("attention_bias", False))
    return TransformerConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, intermediate_size=d["intermediate_size"],
        rope_theta=theta, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else attn_bias, o_bias=attn_bias if mt != "qwen2" else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False, qk_norm=mt == "qwen3",
        max_position=int(d.get("max_position_embeddings", 32768)), rope_scaling=scaling)


def config_to_hf(cfg: TransformerConfig, base: dict | None = None) -> dict:
    """config.json dict for cfg; `base` (the source config) keeps its other fields."""
    if cfg.qk_norm:
        mt = "qwen3"
    elif cfg.qkv_bias and not cfg.o_bias:
        mt = "qwen2"
    else:
        mt = "llama"
    d = dict(base or {})
    if d.get("model_type", mt) != mt:
        raise ValueError(f"cfg describes a {mt} model but the base config is {d['model_type']!r}")
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    d.update(
        model_type=mt, architectures=d.get("architectures") or [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                                                    "llama": "LlamaForCausalLM"}[mt]],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta, rope_scaling=scaling,
        rope_parameters={"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
    )
    if mt != "qwen2":
        d["attention_bias"] = cfg.o_bias
    if mt == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    return d


# ---------------------------------------------------------------------------------------------
# names


def flatten(params) -> dict:
    """{"model.layers.0.self_attn.q_proj.weight": array, ...} (HF state-dict names)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = x
    return out


def unflatten(flat: dict, like):
    """Inverse of `flatten` onto the structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def expected_shapes(cfg: TransformerConfig) -> dict:
    shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg))
    return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def check_tensors(found: dict, cfg: TransformerConfig, where: str = "checkpoint") -> None:
    """found: name -> shape. Raises ValueError naming every missing / mismatched / unexpected one."""
    want = expected_shapes(cfg)
    ignored = {n for n in found if n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")  # tied: a stored copy of the embedding is not used
    missing = sorted(n for n in want if n not in found)
    unexpected = sorted(n for n in found if n not in want and n not in ignored)
    bad = sorted(f"{n}: {tuple(found[n])} (expected {want[n]})" for n in want
                 if n in found and tuple(found[n]) != want[n])
    if missing or unexpected or bad:
        def show(title, xs):
            return f"\n  {title} ({len(xs)}): " + ", ".join(xs[:12]) + (" ..." if len(xs) > 12 else "") if xs else ""
        raise ValueError(f"{where} does not match its config.json:" + show("missing tensors", missing)
                         + show("mismatched shapes", bad) + show("unexpected tensors", unexpected)
                         + "\n  (fix: point to the checkpoint that belongs to this config.json)")


# ---------------------------------------------------------------------------------------------
# loading


def resolve(path_or_id: str) -> str:
    """A local directory, or a hub id downloaded with huggingface_hub (config, weights, tokenizer)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id!r} is not a checkpoint directory (nor a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModuleNotFoundError("loading a hub id needs huggingface_hub: pip install huggingface_hub "
                                  "(or pass a local checkpoint directory)") from e
    return snapshot_download(path_or_id, allow_patterns=list(HUB_PATTERNS))


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in model.safetensors.index.json are missing: {missing}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                            "checkpoints are supported; convert .bin with transformers' save_pretrained)")


def read_tensors(path: str, dtype=jnp.float32) -> dict:
    from safetensors import safe_open

    out = {}
    for fn in _weight_files(path):
        with safe_open(fn, framework="flax") as f:
            for name in sorted(f.keys()):
                out[name] = f.get_tensor(name).astype(dtype)
    return out


def _json(path, name):
    fn = os.path.join(path, name)
    if not os.path.exists(fn):
        return {}
    with open(fn) as f:
        return json.load(f)


def _ids(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def load_tokenizer(path: str):
    """(tokenizers.Tokenizer or None, chat template or None, eos ids)."""
    tok = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ModuleNotFoundError("reading tokenizer.json needs `tokenizers`: pip install tokenizers") from e
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tc = _json(path, "tokenizer_config.json")
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and os.path.exists(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()
    eos = _ids(_json(path, "config.json").get("eos_token_id")) + _ids(_json(path, "generation_config.json").get("eos_token_id"))
    eos_tok = tc.get("eos_token")
    eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
    if tok is not None and eos_tok and tok.token_to_id(eos_tok) is not None:
        eos.append(tok.token_to_id(eos_tok))
    return tok, template, tuple(dict.fromkeys(eos))


def _token_text(x):
    return x.get("content") if isinstance(x, dict) else x


def special_tokens(path: str, tok) -> dict:
    """The BOS convention of a checkpoint's family: {"bos_token", "eos_token"} (strings a chat
    template renders: Llama-3's starts with {{ bos_token }}), "bos_id" (None: no BOS, as in Qwen)
    and "add_bos" (whether a plain prompt starts with BOS: tokenizer_config's add_bos_token, else
    what the tokenizer's own post-processor does -- Llama-3's adds <|begin_of_text|>)."""
    tc = _json(path, "tokenizer_config.json")
    bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
    bos_id = tok.token_to_id(bos) if tok is not None and bos else None
    add = tc.get("add_bos_token")
    if add is None:
        add = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return {"bos_token": bos or "", "eos_token": eos or "", "bos_id": bos_id, "add_bos": bool(add and bos_id is not None)}


def load_pretrained(path_or_id: str, dtype=jnp.float32) -> Pretrained:
    path = resolve(path_or_id)
    hf_config = _json(path, "config.json")
    if not hf_config:
        raise FileNotFoundError(f"{path}: no config.json")
    cfg = config_from_hf(hf_config)
    tensors = read_tensors(path, dtype)
    check_tensors({k: v.shape for k, v in tensors.items()}, cfg, where=path)
    params = unflatten(tensors, jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), cfg)))
    tok, template, eos = load_tokenizer(path)
    return Pretrained(params, cfg, tok, template, eos, hf_config, path, special_tokens(path, tok))


def apply_chat_template(template: str, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
    """Render a Hugging Face (jinja2) chat template. Needs jinja2. Pass the checkpoint's
    bos_token / eos_token (`special_tokens`) as kwargs, as transformers does: Llama-3 templates
    begin with {{ bos_token }}."""
    if not template:
        raise ValueError("this checkpoint has no chat template; format the prompt yourself")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ModuleNotFoundError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


# ---------------------------------------------------------------------------------------------
# export


def save_pretrained(out_dir: str, params, cfg: TransformerConfig, *, source: str | None = None,
                    dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write params as HF safetensors (+ index json when sharded) and config.json into out_dir;
    copy the tokenizer / generation files from `source` (a checkpoint dir) when given.
    Returns the written weight files. dtype: "float32" or "bfloat16"."""
    from safetensors.flax import save_file

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    flat = flatten(params)
    check_tensors({k: v.shape for k, v in flat.items()}, cfg, where="params")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: jnp.asarray(v, dtype) for k, v in flat.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].size * tensors[k].dtype.itemsize
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + nbytes
    shards.append(cur)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fn, shard in zip(files, shards):
        save_file(shard, os.path.join(out_dir, fn), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in tensors.values())
        weight_map = {k: fn for fn, shard in zip(files, shards) for k in shard}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    base = _json(source, "config.json") if source else {}
    d = config_to_hf(cfg, base)
    d["torch_dtype"] = d["dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    if source:
        for name in TOKENIZER_FILES + ("chat_template.jinja",):
            src = os.path.join(source, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return [os.path.join(out_dir, fn) for fn in files]
