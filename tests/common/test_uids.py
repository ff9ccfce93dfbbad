from __future__ import annotations

from dicom_node.common.uids import derive_uid, is_valid_uid, output_uids


def test_derived_uids_are_deterministic_and_valid() -> None:
    a = output_uids("1.2.3", "cxr", "1.0", "seg", ["1.2.3.1", "1.2.3.2"])
    b = output_uids("1.2.3", "cxr", "1.0", "seg", ["1.2.3.2", "1.2.3.1"])
    assert a == b
    assert all(is_valid_uid(u) and u.startswith("2.25.") for u in a)


def test_derived_uids_differ_by_each_part() -> None:
    base = output_uids("1.2.3", "cxr", "1.0", "seg", ["1.1"])
    assert output_uids("1.2.4", "cxr", "1.0", "seg", ["1.1"])[0] != base[0]
    assert output_uids("1.2.3", "cxr", "1.1", "seg", ["1.1"])[0] != base[0]
    assert output_uids("1.2.3", "cxr", "1.0", "sr", ["1.1"])[0] != base[0]
    # More source instances: same output series, a new instance that supersedes the old.
    late = output_uids("1.2.3", "cxr", "1.0", "seg", ["1.1", "1.2"])
    assert late[0] == base[0] and late[1] != base[1]
    assert derive_uid("a", "b") != derive_uid("ab")


def test_uid_validation() -> None:
    assert is_valid_uid("1.2.840.10008.1.1")
    for bad in ("", "1.2.3/../../etc", "1..2", "01.2", "1.2.", "1." + "2" * 64, None, 5):
        assert not is_valid_uid(bad)
