"""The ``mindformers-lora`` command."""
import argparse
import os
import sys


def _cmd_plugins(_args) -> int:
    import mindformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from mindformers_lora_ext import integration, registry  # pylint: disable=import-outside-toplevel

    statuses = registry.load_plugins()
    print(f"entry-point group: {registry.ENTRY_POINT_GROUP}")
    for status in statuses:
        state = "ok" if status.ok else f"FAILED: {status.error}"
        print(f"  plugin {status.name} = {status.value} ({status.distribution}): {state}")
    print("registered:")
    for reg in registry.registered():
        print(f"  {reg.kind:<9} {reg.name:<24} {registry.qualname(reg.obj)}  [{reg.origin}]")
    print(f"pet types MindFormers can build: {', '.join(integration.known_pet_types())}")
    return 0 if all(s.ok for s in statuses) else 1


def _cmd_demo(args) -> int:
    from mindformers_lora_ext.demo import run_demo  # pylint: disable=import-outside-toplevel
    summary = run_demo(args.config, args.steps, args.output_dir)
    return 0 if summary["last_loss"] < summary["first_loss"] and not summary["changed_frozen"] else 1


def _pet_config(pet: dict):
    """Our config object for a pet_config mapping (plugins must be loaded)."""
    import mindformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from mindformers_lora_ext import registry  # pylint: disable=import-outside-toplevel
    registry.load_plugins()
    config_cls = registry.pet_type_config_class(pet.get("pet_type"))
    if config_cls is None:
        raise SystemExit(f"pet_type {pet.get('pet_type')!r} is not one of ours: {registry.registered('pet_type')}")
    return config_cls.from_pet_config(pet)


def _cmd_export(args) -> int:
    # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext import adapter_files, peft_format
    if os.path.isdir(args.adapter):  # one of our adapter dirs (already PEFT's layout): a clean copy
        source = adapter_files.resolve_adapter_dir(args.adapter)
        config, tensors = adapter_files.read_adapter_dir(source)
        try:
            peft_format.check_peft(config, source)
        except adapter_files.AdapterFileError as exc:
            raise SystemExit(str(exc)) from exc
        adapter_files.write_adapter_dir(args.out, tensors, config)
        print(f"exported {source} -> {args.out} ({len(tensors)} tensors)")
        return 0
    if not args.config:
        raise SystemExit("export of a MindSpore checkpoint needs --config: the run's YAML (its pet_config)")
    from mindformers.tools.register import MindFormerConfig
    from mindformers_lora_ext.merge import adapter_cells, is_adapter_tensor, load_run_checkpoint, GATES
    pet = _pet_config(dict(MindFormerConfig(args.config).model.model_config.pet_config))
    saved = tuple(pet.modules_to_save or ())
    shared = pet.file_shared_tensors()  # model-level tensors (no cell prefix) the files hold
    arrays = {}
    for name, value in load_run_checkpoint(args.adapter).items():
        cell, _, attr = name.rpartition(".")
        if (is_adapter_tensor(name) and attr not in GATES and (cell or name in shared)) or \
                any(cell == m or cell.endswith("." + m) for m in saved):
            arrays[name] = value
    if getattr(pet, "init_lora_weights", None) == "eva":
        arrays = _eva_ranks_in_use(arrays, pet)
    cells = adapter_cells(arrays, pet)  # gates dropped: merged cells' adapters are exported too
    if not cells:
        raise SystemExit(f"{args.adapter}: no adapter tensor of pet_type {pet.pet_type!r} (e.g. "
                         f"'<cell>.lora_A', '<cell>.hada_w1_a'): wrong --config for this checkpoint?")
    names = _run_names(args.names, args.adapter, cells)
    try:
        adapter_files.write_adapter_dir(args.out, peft_format.to_peft_tensors(arrays, pet, names),
                                        peft_format.peft_config_dict(pet, names))
    except ValueError as exc:  # hf_map.HfMapError: a cell PEFT cannot hold exactly
        raise SystemExit(f"{args.adapter} cannot be exported to HF PEFT: {exc}") from exc
    print(f"exported {len(cells)} adapted cells ({len(arrays)} tensors) from {args.adapter} -> {args.out}")
    return 0


def _run_names(path, checkpoint, cells):
    """The HF name map of a run checkpoint's cells: ``path`` (a mindformers_adapter.json or an
    adapter directory), else the sidecar that the run wrote to its output directory (searched
    from the checkpoint upwards), else legacy Llama's table if it names every cell."""
    # pylint: disable=import-outside-toplevel
    import json
    from mindformers_lora_ext import adapter_files, hf_map
    from mindformers_lora_ext.naming import hf_module_name
    candidates = [path if not os.path.isdir(path) else os.path.join(path, adapter_files.META_NAME)] if path else []
    if not path:
        here = os.path.dirname(os.path.abspath(checkpoint))
        for _ in range(5):
            candidates.append(os.path.join(here, adapter_files.META_NAME))
            here = os.path.dirname(here)
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as handle:
                data = json.load(handle).get("hf_map")
            if data and set(cells) <= set(data["cells"]):
                return hf_map.HfMap.from_json(data)
    unnamed = [c for c in cells if hf_module_name(c) == c]
    if unnamed:
        raise SystemExit(f"no HF names for cells {unnamed[:3]} of {checkpoint}: not legacy Llama cells, and no "
                         f"{adapter_files.META_NAME} with their map was found (pass --names, the file the run "
                         f"wrote to its output_dir)")
    return hf_map.legacy_map(cells)


def _eva_ranks_in_use(arrays, pet):
    """A run checkpoint's EVA tensors cut to each cell's rank in use (cells at rank 0 dropped),
    the ranks and alphas recorded in ``pet`` (rank_pattern / alpha_pattern of the export)."""
    from mindformers_lora_ext.merge import eva_in_use  # pylint: disable=import-outside-toplevel
    out = dict(arrays)
    ranks = {}
    for cell in sorted({n[: -len(".lora_A")] for n in arrays if n.endswith(".lora_A")}):
        mine = {n.rsplit(".", 1)[-1]: v for n, v in arrays.items() if n.rsplit(".", 1)[0] == cell}
        spec = pet.module_options(cell)
        if mine["lora_A"].shape[0] <= spec.rank:
            continue  # not padded: already at its rank
        trimmed, rank, alpha = eva_in_use(mine, spec, pet)
        if rank == 0:
            for attr in mine:
                out.pop(f"{cell}.{attr}")
            continue
        out.update({f"{cell}.{attr}": value for attr, value in trimmed.items()})
        ranks[cell] = (rank, alpha)
    pet.record_ranks(ranks)
    return out


def _cmd_import(args) -> int:
    # pylint: disable=import-outside-toplevel
    import yaml
    from mindformers_lora_ext import adapter_files, peft_format
    from mindformers_lora_ext.merge import save_mindspore_checkpoint
    directory = adapter_files.resolve_adapter_dir(args.peft)
    config, tensors = adapter_files.read_adapter_dir(directory)
    pet = peft_format.pet_config_from_peft(config)
    arrays = peft_format.from_peft_tensors(tensors, _pet_config(pet), peft_format.hf_map_of(config))
    save_mindspore_checkpoint(sorted(arrays.items()), args.out)
    print(f"imported {directory} -> {args.out} ({len(arrays)} tensors, MindFormers names). Its pet_config:")
    print(yaml.safe_dump({"pet_config": pet}, sort_keys=False).rstrip())
    return 0


def _cmd_merge(args) -> int:
    # pylint: disable=import-outside-toplevel
    from tqdm import tqdm
    from mindformers_lora_ext import adapter_files, peft_format, merge
    directory = adapter_files.resolve_adapter_dir(args.adapter)
    config, tensors = adapter_files.read_adapter_dir(directory)
    pet = _pet_config(peft_format.pet_config_from_peft(config))
    adapter = peft_format.from_peft_tensors(tensors, pet, peft_format.hf_map_of(config))
    if args.base.endswith(".safetensors"):
        with tqdm(total=os.path.getsize(args.base), unit="B", unit_scale=True, desc="merge") as bar:
            counts = merge.merge_safetensors_streaming(args.base, args.out, adapter, pet, bar.update)
    else:
        print("note: a .ckpt base is loaded whole; a .safetensors base is merged one tensor at a time")
        counts = merge.merge_checkpoint(args.base, args.out, pet, adapter)
    print(f"merged {counts['merged_cells']} cells of {directory} into {args.base} -> {args.out} "
          f"({counts['tensors_written']} tensors)")
    return 0


def _cmd_convert(args) -> int:
    from mindformers_lora_ext.pissa_to_lora import convert_adapter_dir  # pylint: disable=import-outside-toplevel
    directory, initial = convert_adapter_dir(args.adapter, args.out, args.initial)
    print(f"converted {directory} (initial adapter {initial}) -> {args.out}: a plain LoRA of twice the "
          f"rank for the original base weights")
    return 0


_INSPECT_SHOWN_ELSEWHERE = {"peft_type", "mindformers_pet_type", "mindformers_hf_map", "target_modules", "rank_pattern", "task_type",
                            "base_model_name_or_path", "inference_mode", "fan_in_fan_out", "bias"}


def _cmd_inspect(args) -> int:
    # pylint: disable=import-outside-toplevel
    import math
    import numpy as np
    from mindformers_lora_ext import adapter_files
    from mindformers_lora_ext.tuners.targeting import layer_index
    directory = adapter_files.resolve_adapter_dir(args.dir)
    config, tensors = adapter_files.read_adapter_dir(directory)
    print(f"adapter {directory}")
    # every method's own options (LoRA's r/lora_alpha/use_dora, VeRA's projection_prng_key, ...)
    options = ", ".join(f"{k}={v}" for k, v in sorted(config.items())
                        if k not in _INSPECT_SHOWN_ELSEWHERE and v is not None)
    print(f"  type {config.get('peft_type')} (pet_type {config.get('mindformers_pet_type', '?')}): {options}")
    print(f"  targets {config.get('target_modules')}; rank_pattern {config.get('rank_pattern') or {}}")
    dtypes = sorted({str(v.dtype) for v in tensors.values()})
    print(f"  {len(tensors)} tensors, {sum(int(v.size) for v in tensors.values())} params, dtypes {dtypes}")
    norms = {}
    for key, value in tensors.items():
        index = layer_index(key)
        group = f"layer {index}" if index is not None else key
        norms[group] = norms.get(group, 0.0) + float(np.square(value.astype(np.float64)).sum())
    for group, total in norms.items():
        print(f"  norm {group}: {math.sqrt(total):.6g}")
    extra = sorted(set(os.listdir(directory)) - {adapter_files.CONFIG_NAME, adapter_files.WEIGHTS_NAME})
    if extra:
        print(f"  also: {', '.join(extra)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindformers-lora",
                                     description="LoRA-family adapters for MindFormers.")
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list plugins and what they registered")
    plugins.set_defaults(func=_cmd_plugins)
    demo = sub.add_parser("demo", help="fine-tune a tiny Llama on CPU (under a minute)")
    from mindformers_lora_ext.demo import tiny_configs  # pylint: disable=import-outside-toplevel
    demo.add_argument("--config", "--pet-type", dest="config", default="lora_ext",
                      choices=sorted(tiny_configs()),
                      help="shipped tiny config (a pet type, or loraplus); default lora_ext")
    demo.add_argument("--steps", type=int, default=32, help="training steps (default 32)")
    demo.add_argument("--output-dir", default="mindformers_lora_demo", help="where data and outputs go")
    demo.set_defaults(func=_cmd_demo)
    export = sub.add_parser("export", help="write an adapter as an HF PEFT directory")
    export.add_argument("--adapter", required=True,
                        help="one of our adapter dirs (or a root with 'latest'), or a MindSpore "
                             "checkpoint of a run with one of our pet types (.ckpt/.safetensors; "
                             "needs --config)")
    export.add_argument("--to", choices=["peft"], default="peft", help="target format")
    export.add_argument("--config", help="the run's YAML, for a checkpoint --adapter")
    export.add_argument("--names", help="for a checkpoint of an mcore model: the run's mindformers_adapter.json "
                                        "(its HF name map; default: found beside the checkpoint or above it)")
    export.add_argument("out", help="output directory")
    export.set_defaults(func=_cmd_export)
    imp = sub.add_parser("import", help="HF PEFT LoRA directory -> MindSpore checkpoint (our names)")
    imp.add_argument("--peft", required=True, help="PEFT adapter directory")
    imp.add_argument("out", help="output checkpoint (.safetensors or .ckpt)")
    imp.set_defaults(func=_cmd_import)
    merge = sub.add_parser("merge", help="fold an adapter into a base checkpoint")
    merge.add_argument("--base", required=True, help="base checkpoint (.safetensors: streamed; .ckpt)")
    merge.add_argument("--adapter", required=True, help="adapter directory (ours or HF PEFT's)")
    merge.add_argument("--out", required=True, help="merged checkpoint, same format as --base")
    merge.set_defaults(func=_cmd_merge)
    convert = sub.add_parser("convert", help="PiSSA/OLoRA adapter -> plain LoRA (rank 2r) for the "
                                             "original base model")
    convert.add_argument("--adapter", required=True, help="PiSSA/OLoRA adapter dir, or a root with 'latest'")
    convert.add_argument("--initial", help="the run's initial adapter (default: 'initial' beside the step dir)")
    convert.add_argument("out", help="output adapter directory")
    convert.set_defaults(func=_cmd_convert)
    inspect = sub.add_parser("inspect", help="describe an adapter directory")
    inspect.add_argument("dir", help="adapter directory, or a root with 'latest'")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mindformers_lora_ext.adapter_files import AdapterFileError  # pylint: disable=import-outside-toplevel
    try:
        return args.func(args)
    except (AdapterFileError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"mindformers-lora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
