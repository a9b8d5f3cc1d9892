"""Each task's data, rewards, evaluation and adapters together:

    arithmetic.py   synthetic arithmetic problems, the noisy corpus, the answer checker, digit step rewards
    instructions/   self-supervised instruction following: constraints and their verifiers, the instruction
                    reward, the constraint classifier and its files, the curriculum, pseudo-labels, IFEval
    maze.py         the built-in maze's vocabulary and random-walk SFT rows
    rewards.py      the named rewards a recipe picks (reward.name) and each task's answer format
    sources.py      the named synthetic data sources (data.source), else a file or a hub dataset
"""
