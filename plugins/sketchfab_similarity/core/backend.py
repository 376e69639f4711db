"""Keras backend and device helpers: which backend, whether it sees a GPU, how many cores we may use.

Kept apart from the model code so the refresh's GPU engine and the extraction engines
configure the backend the same way, before Keras is first imported.
"""

from __future__ import annotations

import contextlib
import glob
import os


def configure_backend() -> None:
    """Before Keras is imported: TensorFlow by default; GPU memory taken as needed, not all at once."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def gpu_available() -> bool:
    """Whether the active Keras backend sees a GPU."""
    configure_backend()
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):  # already initialised: the env default applies
                tf.config.experimental.set_memory_growth(gpu, True)
        return bool(gpus)
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_device_files() -> bool:
    """A cheap hint that this machine has an NVIDIA GPU, checked before importing a Keras backend."""
    return os.path.exists("/dev/nvidia0") or bool(glob.glob("/proc/driver/nvidia/gpus/*"))
