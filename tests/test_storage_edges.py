"""pipeline/storage.py beyond the happy path: a Location pickles as its URL alone, delete_all
with nothing kept, and the wording of object-store errors no rule knows (and of errors that are
not the object store's: passed on unchanged)."""

from __future__ import annotations

import pickle

import pytest
from obstore.exceptions import GenericError

from flatdino.pipeline.storage import Location, StorageError, describe, explained


def test_a_location_pickles_as_its_url_and_rebuilds_its_store(tmp_path):
    location = Location(str(tmp_path / "s.zarr"))
    location.write("a", b"1")  # builds the cached store object
    assert "store" in location.__dict__
    raw = pickle.dumps(location)
    assert b"LocalStore" not in raw
    clone = pickle.loads(raw)
    assert clone == location and "store" not in clone.__dict__
    assert clone.read("a") == b"1"


def test_delete_all_with_nothing_kept_empties_the_location(tmp_path):
    location = Location(str(tmp_path / "s.zarr"))
    for key in ("zarr.json", "x/c/0", ".flatdino-lock"):
        location.write(key, b"1")
    location.delete_all()
    assert location.keys() == []


def test_an_object_store_error_no_rule_knows_is_its_first_line():
    error = GenericError("the disk is on fire\nstack trace ...")
    assert describe("s3://b/x", error) == "'s3://b/x': S3 error: the disk is on fire"
    assert describe("gs://b/x", GenericError()) == "'gs://b/x': GCS error: GenericError"


def test_errors_not_of_the_object_store_pass_through_unchanged():
    assert describe("s3://b/x", ValueError("NoSuchBucket")) is None
    with pytest.raises(ValueError, match="^NoSuchBucket$"), explained("s3://b/x"):
        raise ValueError("NoSuchBucket")
    with pytest.raises(StorageError, match="^'az://b/x': Azure error: odd$"), explained("az://b/x"):
        raise GenericError("odd")
