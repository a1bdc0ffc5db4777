import os

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# tests/multidevice needs 8 host devices, which must be set before jax starts:
# tests/test_multidevice.py runs it in a subprocess with OPTAX_GC_MULTIDEVICE=1.
if os.environ.get("OPTAX_GC_MULTIDEVICE") != "1":
    collect_ignore = ["multidevice"]
