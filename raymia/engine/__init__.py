"""Where banks train: the warm pool of Ray workers (`pool`), this process (`bank_job`), the Ray instance
(`cluster`)."""
