"""What MindFormers' stock ``run_mindformer.py`` ``main()`` does, for our demo.

``run_mindformer.py`` lives in MindFormers' source tree, not in its wheel; this is the same
sequence: ``set_output_path`` -> ``build_context`` -> ``Trainer(config)`` -> ``train()``.
"""


def run_main(config):
    """Train (run_mode train/finetune) with a loaded ``MindFormerConfig``; returns the Trainer."""
    # pylint: disable=import-outside-toplevel
    from mindformers.core.context import build_context
    from mindformers.trainer import Trainer
    try:  # where newer run_mindformer.py imports it from
        from mindformers.tools import set_output_path
    except ImportError:  # MindFormers 1.9.0
        from mindformers.utils.file_utils import set_output_path

    if config.run_mode not in ("train", "finetune"):
        raise ValueError(f"run_mode = {config.run_mode!r}: the demo trains; expected 'train' or 'finetune'")
    set_output_path(config.output_dir)
    build_context(config)
    trainer = Trainer(config)
    trainer.train()
    return trainer
