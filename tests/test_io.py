"""Folders lalm-export writes (bundles, LALM checkpoints) take the user's umask, whatever mode
the libraries that write into them choose."""

from __future__ import annotations

import os
import stat

from lalm_export.io import atomic_folder, current_umask


def test_files_written_0600_by_a_library_get_the_users_umask(tmp_path):
    """ONNX writes a graph's external weights 0600 (a 2.5 GB audio tower's `audio_encoder.onnx_data`
    was its owner's alone); so do transformers' safetensors shards."""
    with atomic_folder(tmp_path / "bundle", replace=False) as folder:
        (folder / "sub").mkdir(mode=0o700)
        os.close(os.open(folder / "sub" / "model.onnx_data", os.O_CREAT | os.O_WRONLY, 0o600))
    mask = current_umask()
    assert stat.S_IMODE((tmp_path / "bundle" / "sub" / "model.onnx_data").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "bundle" / "sub").stat().st_mode) == 0o777 & ~mask
