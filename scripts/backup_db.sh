#!/usr/bin/env bash
# Consistent online backup of Levqor's SQLite database.
#
#   scripts/backup_db.sh [DB]      (DB defaults to $SQLITE_PATH, then levqor.db)
#
# Uses SQLite's online backup API through Python's sqlite3 module, so it is
# safe while the service is writing and needs no sqlite3 command-line tool.
# Writes backups/levqor-YYYY-MM-DD-HHMMSS.db and checks it with
# PRAGMA integrity_check; exits non-zero if anything is wrong.
set -euo pipefail

db="${1:-${SQLITE_PATH:-levqor.db}}"
dest_dir="${BACKUP_DIR:-backups}"
python="${PYTHON:-python3}"

if [ ! -f "$db" ]; then
  echo "backup_db: no database at $db" >&2
  exit 1
fi
mkdir -p "$dest_dir"
dest="$dest_dir/levqor-$(date -u +%Y-%m-%d-%H%M%S).db"
if [ -e "$dest" ]; then
  echo "backup_db: $dest already exists" >&2
  exit 1
fi

# Never leave a half-written or unchecked backup behind.
trap 'rm -f "$dest"' ERR

"$python" - "$db" "$dest" <<'PY'
import sqlite3, sys
src_path, dest_path = sys.argv[1], sys.argv[2]
src = sqlite3.connect(src_path, timeout=30)
dest = sqlite3.connect(dest_path)
with dest:
    src.backup(dest, pages=256)  # in steps, so the service's writers are not held up
src.close()
result = dest.execute("PRAGMA integrity_check").fetchone()[0]
dest.close()
if result != "ok":
    sys.exit(f"backup_db: integrity check failed: {result}")
PY
echo "$dest"
