"""`python -m kmnist_sweep`: the command line lives in kmnist_sweep/cli.py."""

from kmnist_sweep.cli import main

if __name__ == "__main__":
    main()
