"""The ``mindformers-lora`` command."""
import argparse
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
