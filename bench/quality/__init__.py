"""Real-model merging-quality benchmark (offline, CPU): see README.md in this folder."""

import os

# Must precede the first `import torch`: on a busy (oversubscribed) machine, spinning OpenMP
# workers make a 2-thread training step several times slower; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing is ever downloaded: the model and the data come from installed wheels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
