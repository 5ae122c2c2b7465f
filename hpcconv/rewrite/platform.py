"""Platform: which manifest entry a profile asks for, and a fast check that an image's platform can run
at the site (before any layer is read). amd64 variants v2..v4 (containerd spelling of the x86-64
levels) must not exceed the site's level."""

from __future__ import annotations

from ..harness.checks import FAIL, PASS, Check
from ..image import Platform


def platform_for(profile) -> Platform:
    """The platform to pick from a multi-arch index for this profile (linux/amd64, linux/arm64, ...)."""
    return profile.platform


def check_platform(image_platform: Platform, profile, available: list[Platform] | None = None) -> Check:
    """Check the chosen image platform against the profile; ``available`` lists an index's platforms
    (for the hint when the image was picked wrongly or has no entry for the site)."""
    want = platform_for(profile)
    got = image_platform.normalized()
    if got.os != "linux" or got.architecture != want.architecture:
        others = ", ".join(str(p) for p in available or [])
        if available and any(p.normalized().architecture == want.architecture for p in available):
            hint = f"the index has {others}: pick --platform {want}"
        elif available:
            hint = f"the index only has {others}: build the image for {want}"
        else:
            hint = f"the image is single-arch: build it for {want} (e.g. docker buildx --platform {want})"
        return Check("rewrite", "platform", FAIL,
                     f"image is {got}, profile {profile.name} runs {want} ({profile.cpu.arch}); {hint}")
    if got.architecture == "amd64" and got.variant:
        level = int(got.variant[1:]) if got.variant[1:].isdigit() else 1
        site = profile.cpu.level_num or 1
        if level > site:
            return Check("rewrite", "platform", FAIL,
                         f"image is {got} (x86-64-v{level}), the site CPU is x86-64-v{site}; pick a "
                         f"linux/amd64 entry of level v{site} or lower")
    return Check("rewrite", "platform", PASS, f"image is {got}, the site runs {want}")
