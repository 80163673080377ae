"""mtl: multi-task learning for dense prediction."""

from omegaconf import OmegaConf


def _backbone_norm(name: str, which: str) -> list[float]:
    """``${backbone_norm:NAME,mean|std}``: the input normalisation of timm model NAME's weights."""
    from mtl.models.pretrained import normalisation  # here: importing timm is slow

    return list(normalisation(name)[which])


OmegaConf.register_new_resolver("backbone_norm", _backbone_norm, replace=True)
