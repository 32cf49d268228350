#!/usr/bin/env bash
# Turns a `debootstrap --variant=minbase` tree into a stand-in for the official
# python:3.11-slim-bookworm image (no registry here): `python`/`pip` as there, pip
# installs as root (no EXTERNALLY-MANAGED), slim like debian:*-slim. Usage: finish-rootfs.sh DIR
set -euo pipefail
dir=${1:?usage: finish-rootfs.sh DIR}

# pip installs into the system python as root, as in the official image.
rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED

# Slim, as debian:*-slim: no docs, man pages or translations, now or from later apt installs.
cat >"$dir/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$dir"/usr/share/{man,groff,info,lintian,linda,locale}/*
# apt: no caches, no lists (the next `apt-get update` fetches them), no recommends.
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
  >"$dir/etc/apt/apt.conf.d/docker-no-recommends"
rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
find "$dir/var/log" -type f -delete
# The build host's name and resolver are not the image's (the runtime mounts its own).
: >"$dir/etc/resolv.conf"
printf 'localhost\n' >"$dir/etc/hostname"
