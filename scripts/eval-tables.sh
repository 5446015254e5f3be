#!/usr/bin/env bash
# Prints eval-conditioning JSON reports (`--json`) as the doc's tables: each mode's NLL per reply
# token, then each paired difference with its 95% interval. The rung scripts end with it.
#
# usage: scripts/eval-tables.sh REPORT.json...
set -euo pipefail
for report in "$@"; do
    jq -r '"\(input_filename): \(.n) pairs from \(.conversations) conversations (\(.bootstrap) bootstrap), \(.modes | to_entries[0].value.tokens) reply tokens\n",
           (.modes | to_entries[] | "| \(.key) | \(.value.nll * 10000 | round / 10000) |"), "",
           (.paired | to_entries[] | "| \(.key) | \(.value.mean * 10000 | round / 10000) | [\(.value.lo * 10000 | round / 10000), \(.value.hi * 10000 | round / 10000)] |")' \
        "$report"
done
