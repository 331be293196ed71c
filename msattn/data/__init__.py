"""Dataset folders: preparation (``msattn.data.prepare``), checking, loading and augmentation."""
