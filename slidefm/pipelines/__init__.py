"""slidefm.pipelines"""
