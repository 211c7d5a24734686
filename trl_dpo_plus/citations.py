"""BibTeX for the papers behind the registered losses, keyed by the arXiv URL each `LossSpec.paper` gives.

A model card cites the paper of every loss it was trained with, and TRL. Entries name the first author and "others"
(the arXiv page lists everyone).
"""

from __future__ import annotations

# arXiv id: (citation key, title, first author "Last, First", year)
PAPERS = {
    "2305.18290": ("rafailov2023direct", "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
                   "Rafailov, Rafael", 2023),
    "2310.12036": ("azar2023general", "A General Theoretical Paradigm to Understand Learning from Human Preferences",
                   "Azar, Mohammad Gheshlaghi", 2023),
    "2402.01306": ("ethayarajh2024kto", "KTO: Model Alignment as Prospect Theoretic Optimization", "Ethayarajh, Kawin",
                   2024),
    "2403.07691": ("hong2024orpo", "ORPO: Monolithic Preference Optimization without Reference Model", "Hong, Jiwoo",
                   2024),
    "2405.14734": ("meng2024simpo", "SimPO: Simple Preference Optimization with a Reference-Free Reward", "Meng, Yu",
                   2024),
    "2403.19159": ("park2024disentangling", "Disentangling Length from Quality in Direct Preference Optimization",
                   "Park, Ryan", 2024),
    "2402.13228": ("pal2024smaug", "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
                   "Pal, Arka", 2024),
    "2406.05882": ("melnyk2024distributional", "Distributional Preference Alignment of LLMs via Optimal Transport",
                   "Melnyk, Igor", 2024),
    "2408.06266": ("doosterlinck2024anchored", "Anchored Preference Optimization and Contrastive Revisions: Addressing "
                   "Underspecification in Alignment", "D'Oosterlinck, Karel", 2024),
    "2404.04656": ("jung2024binary", "Binary Classifier Optimization for Large Language Model Alignment",
                   "Jung, Seungjae", 2024),
    "2401.08417": ("xu2024contrastive", "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance "
                   "in Machine Translation", "Xu, Haoran", 2024),
    "2406.08414": ("lu2024discovering", "Discovering Preference Optimization Algorithms with and for Large Language "
                   "Models", "Lu, Chris", 2024),
    "2402.00856": ("ji2024towards", "Towards Efficient Exact Optimization of Language Model Alignment", "Ji, Haozhe",
                   2024),
    "2309.06657": ("liu2023statistical", "Statistical Rejection Sampling Improves Preference Optimization",
                   "Liu, Tianqi", 2023),
    "2411.15124": ("lambert2024tulu3", "Tulu 3: Pushing Frontiers in Open Language Model Post-Training",
                   "Lambert, Nathan", 2024),
    "2402.05369": ("chen2024noise", "Noise Contrastive Alignment of Language Models with Explicit Rewards",
                   "Chen, Huayu", 2024),
    "2403.00409": ("chowdhury2024provably", "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
                   "Chowdhury, Sayak Ray", 2024),
    "2404.19733": ("pang2024iterative", "Iterative Reasoning Preference Optimization", "Pang, Richard Yuanzhe", 2024),
    "2405.00675": ("wu2024self", "Self-Play Preference Optimization for Language Model Alignment", "Wu, Yue", 2024),
}

TRL = """@software{vonwerra2020trl,
  title  = {{TRL: Transformers Reinforcement Learning}},
  author = {von Werra, Leandro and others},
  year   = {2020},
  url    = {https://github.com/huggingface/trl}
}"""


def bibtex(paper_url: str | None) -> str | None:
    """The BibTeX entry of an arXiv paper URL from the registry, or None for a paper not in the table."""
    arxiv_id = (paper_url or "").rstrip("/").rsplit("/", 1)[-1]
    if arxiv_id not in PAPERS:
        return None
    key, title, author, year = PAPERS[arxiv_id]
    return (f"@article{{{key},\n  title   = {{{{{title}}}}},\n  author  = {{{author} and others}},\n"
            f"  journal = {{arXiv preprint arXiv:{arxiv_id}}},\n  year    = {{{year}}},\n"
            f"  url     = {{https://arxiv.org/abs/{arxiv_id}}}\n}}")
