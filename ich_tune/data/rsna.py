"""RSNA's Kaggle dataset (intracranial hemorrhage detection, 2019): where its files lie, and how often
each class is positive in its labels."""

TRAIN_DIR, TEST_DIR = "stage_2_train", "stage_2_test"  # folders of ID_<hex>.dcm files
LABELS_CSV = "stage_2_train.csv"  # six ID_<hex>_<subtype>,<0|1> rows per image of TRAIN_DIR
SUBMISSION_CSV = "stage_2_sample_submission.csv"  # six ID_<hex>_<subtype>,0.5 rows per image of TEST_DIR
RSNA_ANY = 0.1440  # stage-1 label rates (FACTS.md)
RSNA_RATES = {"epidural": 0.0040, "intraparenchymal": 0.0482, "intraventricular": 0.0352,
              "subarachnoid": 0.0476, "subdural": 0.0630}
