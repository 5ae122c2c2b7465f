"""Platform choice from the profile and the fast wrong-arch check."""

from hpcconv.image import Platform
from hpcconv.profiles import load_profile
from hpcconv.rewrite.platform import check_platform, platform_for


def test_platform_for_profiles():
    assert str(platform_for(load_profile("lumi-g"))) == "linux/amd64"
    assert str(platform_for(load_profile("alps-gh200"))) == "linux/arm64"


def test_single_arch_wrong_arch_fails_fast():
    c = check_platform(Platform.parse("linux/amd64"), load_profile("generic-aarch64"))
    assert c.status == "fail" and "single-arch" in c.detail and "linux/arm64" in c.detail
    assert check_platform(Platform.parse("linux/arm64/v8"), load_profile("alps-gh200")).status == "pass"


def test_index_hint():
    avail = [Platform.parse("linux/amd64"), Platform.parse("linux/arm64")]
    c = check_platform(Platform.parse("linux/amd64"), load_profile("alps-gh200"), avail)
    assert c.status == "fail" and "pick --platform linux/arm64" in c.detail
    c = check_platform(Platform.parse("linux/amd64"), load_profile("alps-gh200"), avail[:1])
    assert "only has linux/amd64" in c.detail


def test_amd64_variant_levels():
    assert check_platform(Platform.parse("linux/amd64/v4"), load_profile("lumi-c")).status == "fail"
    assert check_platform(Platform.parse("linux/amd64/v3"), load_profile("lumi-c")).status == "pass"
    assert check_platform(Platform.parse("linux/amd64/v4"), load_profile("supermuc-ng")).status == "pass"
