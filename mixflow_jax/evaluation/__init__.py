"""What ``mixflow evaluate`` computes, a module per job: the embedded classifier metric
(``classifier_metric``), reading and checking the ADM inputs (``adm_inputs``), the FID
Inception's feature pass (``inception_pass``), and the ADM metric report with its cache
(``adm_report``)."""
