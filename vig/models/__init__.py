"""ViG model family, registered with timm: vig_{tiny,small,base} and vig_h_{tiny,small,base}."""
from vig.models.vig import ViG
from vig.models.vig_h import ViGH

__all__ = ["ViG", "ViGH"]
