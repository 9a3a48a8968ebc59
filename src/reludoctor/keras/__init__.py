"""Keras 3 (TensorFlow backend): watch ``model.fit`` with :class:`DoctorCallback`, scan a built
model (``rd.scan`` takes Keras models too), repair it (:mod:`reludoctor.keras.remedies`), and the
brief's Keras programs as scenarios (:mod:`reludoctor.keras.scenarios`).

Importing this package does not import TensorFlow; ``DoctorCallback`` does, on first use.
"""

from __future__ import annotations

from typing import Any

from reludoctor.keras.watch import KerasWatch, is_keras_model, keras_module, scan_keras

__all__ = ["DoctorCallback", "KerasWatch", "is_keras_model", "keras_module", "scan_keras"]


def __getattr__(name: str) -> Any:
    if name == "DoctorCallback":
        from reludoctor.keras.watch import doctor_callback_class

        return doctor_callback_class()
    raise AttributeError(f"module 'reludoctor.keras' has no attribute {name!r}")
