"""Our own plugin: registered through the same entry-point group as any third party."""


def register():
    """Entry point ``mindformers_lora_ext.plugins: mindformers_lora_ext``."""
    # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.callbacks import AdaLoraRankAllocator, AdapterCheckpoint, TrainingSummary
    from mindformers_lora_ext.config import LORA_PRESETS, AdaLoraConfig, LohaConfig, LokrConfig, VeraConfig
    from mindformers_lora_ext.data_init.callback import DataDrivenInit
    from mindformers_lora_ext.optimizers import LoraPlusAdamW
    from mindformers_lora_ext.registry import (register_callback, register_optimizer,
                                               register_pet_type, register_wrapper)
    from mindformers_lora_ext.tuners.adalora import AdaLoraModel
    from mindformers_lora_ext.tuners.lora import LoraExtModel
    from mindformers_lora_ext.tuners.loha import LohaModel
    from mindformers_lora_ext.tuners.lokr import LokrModel
    from mindformers_lora_ext.tuners.vera import VeraModel
    from mindformers_lora_ext.wrappers import CpuSafeTrainOneStepCell

    for config_cls in LORA_PRESETS:
        register_pet_type(config_cls.pet_type_name, LoraExtModel, config_cls)
    for model_cls, config_cls in ((VeraModel, VeraConfig), (LohaModel, LohaConfig), (LokrModel, LokrConfig),
                                  (AdaLoraModel, AdaLoraConfig)):
        register_pet_type(config_cls.pet_type_name, model_cls, config_cls)
    register_wrapper(CpuSafeTrainOneStepCell)
    register_callback(TrainingSummary)
    register_callback(AdapterCheckpoint)
    register_callback(AdaLoraRankAllocator)
    register_callback(DataDrivenInit)
    register_optimizer(LoraPlusAdamW)
