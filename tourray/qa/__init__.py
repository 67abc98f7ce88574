"""The QA toggle report (`tourray qa`): job.py builds and judges the variant matrix, report.py writes
reports/qa_<name>.{md,csv,json} and its plots."""

from tourray.qa.job import QAConfig, add_parser, run_qa

__all__ = ["QAConfig", "add_parser", "run_qa"]
