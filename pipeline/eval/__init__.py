"""The evaluation job (jobs/eval_retrieval.py).

    evaluate.py   retrieval Recall@1/5/10 both ways and zero-shot top-1/top-5, with the embed job's encoders
"""
