"""ViG library. Importing it registers the ViG models with timm (`timm.create_model("vig_small")`)."""
import vig.models  # noqa: F401  (registers the models)
