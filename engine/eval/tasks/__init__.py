"""The built-in evaluations, one file each (engine/eval/base.py), named in engine/eval/registry.py."""
