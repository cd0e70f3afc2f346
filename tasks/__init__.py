"""Ray tasks: thin remote wrappers around agft_core. No MLflow and no CLI here."""
