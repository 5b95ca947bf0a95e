"""Implements ``core.ports.SeedImages``: NoCloud seed ISO images packed with pycdlib (in memory;
no file is written on the portal host), and the YAML check of ``#cloud-config`` user data."""

from __future__ import annotations

import io
from collections.abc import Mapping

import pycdlib
import yaml


class PycdlibSeedImages:
    """ISO 9660 with Joliet and Rock Ridge, as cloud-localds (genisoimage) writes seeds: cloud-init
    finds the volume by its label and reads the files by their long names."""

    def iso(self, files: Mapping[str, bytes], label: str) -> bytes:
        image = pycdlib.PyCdlib()
        image.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
        try:
            for number, (name, data) in enumerate(sorted(files.items())):
                image.add_fp(io.BytesIO(data), len(data), f"/FILE{number:04d}.;1", rr_name=name,
                             joliet_path=f"/{name}")
            out = io.BytesIO()
            image.write_fp(out)
            return out.getvalue()
        finally:
            image.close()

    def yaml_problem(self, text: str) -> str | None:
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            return f"is not valid YAML{where}: {getattr(error, 'problem', None) or 'cannot be parsed'}"
        except RecursionError:
            return "is not valid YAML: nested too deeply"
        return None
