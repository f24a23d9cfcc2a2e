"""The signing key pair: made only when neither key exists, never over a public key, the private key 0600 from birth."""
import os
import stat

import pytest

from mlnb.core.errors import SignatureError
from mlnb.model.signing import ensure_signing_key


def test_a_public_key_without_its_private_key_is_an_error_and_is_kept(tmp_path):
    ensure_signing_key(tmp_path / "first.key", tmp_path / "signing.pub")
    pub = tmp_path / "signing.pub"
    before = pub.read_bytes()
    with pytest.raises(SignatureError) as raised:
        ensure_signing_key(tmp_path / "signing.key", pub)
    assert str(tmp_path / "signing.key") in str(raised.value) and str(pub) in str(raised.value)
    assert pub.read_bytes() == before and not (tmp_path / "signing.key").exists()


def test_the_private_key_is_0600_from_birth_even_with_a_permissive_umask(tmp_path, monkeypatch):
    private = tmp_path / "keys" / "signing.key"
    placed = []                                           # the mode of each file as it is moved or linked to the key's path

    def watch(real):
        def move(src, dst, *a, **kw):
            if os.fspath(dst) == os.fspath(private):
                placed.append(stat.S_IMODE(os.stat(src).st_mode))
            return real(src, dst, *a, **kw)
        return move
    for name in ("replace", "rename", "link"):
        monkeypatch.setattr(os, name, watch(getattr(os, name)))
    old = os.umask(0o022)
    try:
        assert ensure_signing_key(private, tmp_path / "keys" / "signing.pub")
    finally:
        os.umask(old)
    assert placed and all(mode == 0o600 for mode in placed), [oct(m) for m in placed]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert not [p.name for p in private.parent.iterdir() if p.name.endswith(".tmp")]
