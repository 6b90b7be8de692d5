"""python -m algorithm.serving.profile：见 cli.py。"""
from algorithm.serving.profile.cli import main

if __name__ == "__main__":
    main()
