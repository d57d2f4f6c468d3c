"""Build hook: generate the protobuf/gRPC modules from proto/ before packages are collected."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
from gen_proto import ROOT, generate

generate(ROOT / "generated")
setup()
