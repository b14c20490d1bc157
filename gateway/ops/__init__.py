"""Operations: checks (doctor), integrity (scrub), metrics, logs and index backups."""
