"""`--to llamacpp`: a copy of the model's GGUF with llama.cpp's sliding-window metadata set (through `gguf`).

Keys, as gguf-py (constants.py `Keys.Attention`) and llama.cpp (src/llama-model.cpp) define them:
- `<arch>.attention.sliding_window` (uint32): n_swa; llama.cpp masks key p0 for query p1 iff p1 - p0 >= n_swa
  (llama-hparams.cpp `is_masked_swa`, standard type): the last W positions, the query's own included.
- `<arch>.attention.sliding_window_pattern`: gguf_writer.add_sliding_window_pattern writes "an integer period, or
  one bool per layer (true: SWA)". llama.cpp reads it only for some architectures (`polykv.engines.LLAMACPP_SWA`):
  Gemma 3 reads a period n into `set_swa_pattern(n)` (layer i slides iff n == 0 or i % n < n - 1), Gemma 4 the bools;
  others (llama, qwen2, ...) run no sliding window from metadata and are refused. `--swa-full` turns SWA off.
There are no sinks. The source GGUF is `--model` (a .gguf path or a bundled alias), else the plan's model; its
architecture and geometry must match the plan's fingerprint. Tensors are copied unchanged.
"""

from __future__ import annotations

from pathlib import Path

from polykv.engines import LLAMACPP_SWA, LayerWindow, gguf_arch, period_of
from polykv.errors import InputError, PlanMismatchError
from polykv.io import atomic_write
from polykv.plan import Plan

ENGINE = "llamacpp"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("the llamacpp export needs the gguf package; install it with: pip install gguf") from None
    return gguf


def source_path(plan: Plan, model: str | None) -> Path:
    """The GGUF to copy: `model`, else the plan's model, as a .gguf path or the alias of a bundled GGUF model."""
    from polykv.models import GGUF_LOCATORS

    name = model or plan.model
    if name in GGUF_LOCATORS:
        return GGUF_LOCATORS[name]()
    path = Path(name).expanduser()
    if name.endswith(".gguf") and path.is_file():
        return path
    raise InputError(
        f"the llamacpp export copies a GGUF file, and {name!r} is none; pass --model FILE.gguf (or a bundled alias)"
    )


def _value(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def check_model(reader, plan: Plan, path: Path) -> str:
    """The GGUF's architecture, after checking it is the plan's model (PlanMismatchError otherwise)."""
    arch = _value(reader, "general.architecture")
    fp = plan.fingerprint
    heads = _value(reader, f"{arch}.attention.head_count")
    kv = _value(reader, f"{arch}.attention.head_count_kv") or heads
    head_dim = _value(reader, f"{arch}.attention.key_length")
    if head_dim is None and heads:
        head_dim = _value(reader, f"{arch}.embedding_length") // (heads if isinstance(heads, int) else heads[0])
    kv = list(kv) if isinstance(kv, list) else [kv] * int(_value(reader, f"{arch}.block_count") or 0)
    found = (arch, _value(reader, f"{arch}.block_count"), kv, head_dim)
    wanted = (gguf_arch(fp["model_type"]), fp["num_layers"], fp["num_kv_heads"], fp["head_dim"][0])
    if found != wanted:
        raise PlanMismatchError(
            f"GGUF {path} is {arch} with {found[1]} layers, kv heads {sorted(set(kv))}, head dim {head_dim}, but the "
            f"plan was solved for {plan.model} ({wanted[0]}, {wanted[1]} layers); export a plan made for this model"
        )
    return arch


def metadata(arch: str, windows: list[LayerWindow], current_window: int | None) -> dict:
    """key -> (value, GGUF type name, array item type name or None) of the two sliding-window keys."""
    sliding = [w.window is not None for w in windows]
    sizes = sorted({w.window for w in windows if w.window is not None})
    window = sizes[0] if sizes else current_window
    if LLAMACPP_SWA[arch] == "period":
        pattern = (period_of(sliding), "UINT32", None)
    else:
        pattern = (sliding, "ARRAY", "BOOL")
    out = {f"{arch}.attention.sliding_window_pattern": pattern}
    if window is not None:
        out[f"{arch}.attention.sliding_window"] = (window, "UINT32", None)
    return out


def copy_with(reader, out: Path, changes: dict) -> None:
    """Write the GGUF of `reader` to `out` with `changes` (key -> (value, type, item type)), tensors unchanged."""
    gguf = _gguf()
    arch = _value(reader, "general.architecture")
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in changes:
            continue
        kind = field.types[0]
        writer.add_key_value(
            field.name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    for key, (value, kind, item) in changes.items():
        item_type = getattr(gguf.GGUFValueType, item) if item else None
        writer.add_key_value(key, value, getattr(gguf.GGUFValueType, kind), sub_type=item_type)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def write(plan: Plan, windows: list[LayerWindow], out: Path, options) -> str:
    gguf = _gguf()
    path = source_path(plan, options.model)
    if path.resolve() == out.resolve():
        raise InputError(f"--out {out} is the source GGUF; write the copy elsewhere")
    reader = gguf.GGUFReader(str(path))
    arch = check_model(reader, plan, path)
    changes = metadata(arch, windows, _value(reader, f"{arch}.attention.sliding_window"))
    atomic_write(out, lambda tmp: copy_with(reader, tmp, changes))
    shown = {k.rsplit(".", 1)[-1]: v for k, (v, _, _) in changes.items()}
    return f"{path.name} -> {out.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(shown.items()))
