"""Shipped tuning profiles, installed as the package data ``bonekern.profiles`` (see pyproject.toml).

``<device>.json`` (e.g. ``nvidia-h100-80gb-hbm3.json``, ``cpu-amd-epyc.json``) holds measured winners for one
device, written by ``python -m autotune tune ...`` then ``python -m autotune export --out-dir profiles`` on that
device; :mod:`bonekern.tuning` finds them (``profiles_dir``) after a normal install and in a source checkout.
Only real measurements go here. ``resources/`` holds the kernel engineers' compile-resource baselines.
"""
