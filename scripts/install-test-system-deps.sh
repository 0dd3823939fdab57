#!/usr/bin/env bash
# Debian packages the test suite drives for real: a Prometheus server (tests/deploy) and a headless
# Chromium with its driver (tests/browser). Installs only what is missing; where apt cannot run
# (not root, no Debian), it says so and the tests that need the package skip with a printed reason.
set -uo pipefail
packages=(prometheus chromium chromium-driver)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get: cannot install ${missing[*]}; the tests that need them will skip" >&2
    exit 0
fi
sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo -n)
echo "installing Debian packages for the tests: ${missing[*]}"
if ! { "${sudo_cmd[@]}" apt-get update -qq && \
       DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "could not install ${missing[*]}; the tests that need them will skip" >&2
fi
# Debian starts the prometheus service on install; the tests run their own server on their own port.
if command -v systemctl >/dev/null 2>&1; then "${sudo_cmd[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
pkill -x prometheus >/dev/null 2>&1 || true
exit 0
