"""mtmm never downloads (DESIGN.md, offline): everything Hugging Face loads comes from local folders or caches."""

import huggingface_hub.constants


def offline() -> None:
    """Hugging Face's own offline switch, on before every from_pretrained. local_files_only alone is not enough: with
    peft installed, transformers still asks the Hub for an adapter_config.json of a name it cannot find locally, and
    retries for ~25 s without a network. The switch is read from HF_HUB_OFFLINE when huggingface_hub is imported,
    which may be before mtmm is (a program that imports transformers first), so it is set on the module here."""
    huggingface_hub.constants.HF_HUB_OFFLINE = True
