"""``python -m lowbit ...`` (and ``torchrun ... -m lowbit quantize ...``): the command line."""

from lowbit.cli import main

if __name__ == "__main__":
    main()
