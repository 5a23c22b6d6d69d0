"""Model core: settings, images, backbones, anomaly models, calibration, the model store, evaluation."""
