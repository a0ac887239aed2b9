"""The path of MindFormers' stock ``run_mindformer.py`` ``main()``, for tests.

``run_mindformer.py`` is not shipped in the mindformers wheel. This script does what its
``__main__`` block and ``main()`` do for the options our tests use, and imports nothing but
MindFormers: our plugin must be loaded by the ``.pth`` hook alone.

``--cpu_standins`` (test-only, opt-in) first installs the CPU stand-ins of ``mcore_cpu.py``
(next to this script) so mcore models (``use_legacy: False``) run on CPU.
"""
import argparse
import os
import sys

from mindformers.core.context import build_context
from mindformers.tools.register import MindFormerConfig
from mindformers.trainer import Trainer

try:  # the stock script imports it from here in newer MindFormers
    from mindformers.tools import set_output_path
except ImportError:  # MindFormers 1.9.0 keeps it in utils
    from mindformers.utils.file_utils import set_output_path


def main(config):
    set_output_path(config.output_dir)
    build_context(config)
    trainer = Trainer(config)
    if config.run_mode in ("train", "finetune"):
        trainer.train()
    elif config.run_mode == "eval":
        trainer.evaluate(eval_checkpoint=config.load_checkpoint)
    elif config.run_mode == "predict":
        trainer.predict(predict_checkpoint=config.load_checkpoint, input_data=config.input_data)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--run_mode", default=None)
    parser.add_argument("--train_dataset_dir", default=None)
    parser.add_argument("--eval_dataset_dir", default=None)
    parser.add_argument("--predict_data", default=None, nargs="+")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--load_checkpoint", default=None)
    parser.add_argument("--use_parallel", default=None, type=lambda s: s.lower() == "true")
    parser.add_argument("--cpu_standins", action="store_true",
                        help="test-only: install tests/mcore_cpu.py's CPU stand-ins before the model is built")
    args = parser.parse_args()
    if args.cpu_standins:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import mcore_cpu  # pylint: disable=import-outside-toplevel
        mcore_cpu.install()
    cfg = MindFormerConfig(args.config)
    if args.run_mode is not None:
        cfg.run_mode = args.run_mode
    if args.use_parallel is not None:
        cfg.use_parallel = args.use_parallel
    if args.load_checkpoint is not None:
        cfg.load_checkpoint = args.load_checkpoint
    if args.train_dataset_dir:
        cfg.train_dataset.data_loader.dataset_dir = args.train_dataset_dir
    if args.eval_dataset_dir:
        cfg.eval_dataset.data_loader.dataset_dir = args.eval_dataset_dir
    if args.predict_data is not None:
        cfg.input_data = args.predict_data
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    main(cfg)
