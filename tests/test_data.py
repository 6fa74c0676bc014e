"""The packaged texts: present with the sha256 their README gives, and the SPINQUANT_DATA override."""

import re

import pytest

from spinquant import data
from spinquant.errors import UserError


def test_packaged_texts_are_the_split_their_readme_describes(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    readme = (data.PACKAGED / "README.md").read_text()
    for path in (data.calibration_text(), data.evaluation_text()):
        assert path.parent == data.PACKAGED
        listed = re.search(rf"`{path.name}` \|[^\n]*\| ([0-9a-f]{{64}}) \|", readme).group(1)
        assert data.text_sha256(data.read_text(path)) == listed
    assert "Creative Commons Attribution-ShareAlike 3.0" in readme


def test_the_out_of_domain_text_is_the_one_its_readme_describes():
    readme = (data.OUT_OF_DOMAIN_TEXT.parent / "README.md").read_text()
    listed = re.search(r"`eval.txt` \|[^\n]*\| ([0-9a-f]{64}) \|", readme).group(1)
    assert data.text_sha256(data.read_text(data.OUT_OF_DOMAIN_TEXT)) == listed
    assert "public domain" in readme


def test_spinquant_data_points_both_defaults_at_another_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    (tmp_path / "calib.txt").write_text("calibrate here")
    assert data.read_text(data.calibration_text()) == "calibrate here"
    with pytest.raises(UserError, match=rf"text file not found: {re.escape(str(tmp_path / 'eval.txt'))} \(set by SPINQUANT_DATA\)"):
        data.read_text(data.evaluation_text())
