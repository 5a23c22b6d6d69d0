"""The one Label Studio adapter: REST client and media URLs, labeling config, regions, annotations."""

from pathlib import Path

LABELING_CONFIG = Path(__file__).resolve().parent / "labeling_config.xml"  # the recommended config
