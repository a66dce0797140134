#!/bin/bash
# test_crash_short: the CI-sized run of scripts/crash-test.sh (80 images, 6 SIGKILLs).
# The long run (50+ kills over a few hundred images) is scripts/crash-test.sh with its defaults.
exec bash "${BLIP_SRC:-.}/scripts/crash-test.sh" 80 6 12345
