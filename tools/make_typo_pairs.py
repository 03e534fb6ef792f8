"""Rebuild kronecker_scale/probes/data/typo_pairs.jsonl (the spelling-robustness probe's 121 pairs).

Each clean prompt marks one content word (*stars*). Its typo is a real misspelling from codespell
2.4.3's dictionary (`pip download --no-deps codespell==2.4.3`, unzip codespell_lib/data/dictionary.txt;
lines `wrong->right`) when one lies 1-2 edits away (optimal string alignment distance; same first letter
preferred), otherwise the hand-made typo next to the prompt. Each record says which (`source`).

    python tools/make_typo_pairs.py codespell_lib/data/dictionary.txt > kronecker_scale/probes/data/typo_pairs.jsonl
"""

import json
import sys
from collections import defaultdict

PROMPTS = {
    "geography": [
        ("The capital of *France* is", "Frnace"),
        ("The capital of *Germany* is", "Gremany"),
        ("The largest *ocean* on Earth is the", "ocaen"),
        ("The longest *river* in Africa is the", "rvier"),
        ("Mount Everest is the highest *mountain* in the", "moutain"),
        ("The capital of *Japan* is", "Jpaan"),
        ("The Sahara is a large *desert* in", "dessert"),
        ("Paris is a city in the *country* of", "contry"),
        ("The capital of *Italy* is", "Itlay"),
        ("The Amazon *rainforest* is in South", "rainforrest"),
        ("Canada lies to the *north* of the United", "nroth"),
    ],
    "math": [
        ("Two *plus* two equals", "puls"),
        ("Three times *three* equals", "thre"),
        ("Ten *minus* four equals", "minsu"),
        ("The square *root* of nine is", "roto"),
        ("One *hundred* divided by ten is", "hundread"),
        ("Half of *twenty* is", "twnety"),
        ("A triangle has three *sides* and three", "sdies"),
        ("The *number* after seven is", "nubmer"),
        ("Five *multiplied* by two is", "multipled"),
        ("An even number is *divisible* by", "divisable"),
        ("The sum of the *angles* of a triangle is", "angels"),
    ],
    "time": [
        ("The day after *Monday* is", "Mnoday"),
        ("There are seven days in a *week* and twelve months in a", "weke"),
        ("The month after *January* is", "Janaury"),
        ("There are sixty *minutes* in an", "mintues"),
        ("The first *month* of the year is", "mnoth"),
        ("The *season* after winter is", "seaosn"),
        ("There are twenty-four *hours* in a", "huors"),
        ("The day before *Friday* is", "Firday"),
        ("After *yesterday* comes today, and after today comes", "yesturday"),
        ("The last *month* of the year is", "motnh"),
        ("A *century* is a period of one hundred", "centruy"),
    ],
    "colors": [
        ("The color of the clear *sky* is", "ksy"),
        ("Grass is usually the *color*", "colour"),
        ("Mixing blue and *yellow* makes", "yelow"),
        ("A ripe *banana* is", "banan"),
        ("Snow is *white* and coal is", "whtie"),
        ("The *color* of blood is", "coler"),
        ("A ripe *tomato* is", "tomatoe"),
        ("Mixing red and *white* makes", "wihte"),
        ("The *colors* of the rainbow are red, orange,", "colros"),
        ("An *orange* is the color", "oragne"),
        ("The leaves of a *tree* in summer are", "tere"),
    ],
    "idiom": [
        ("A penny saved is a penny *earned*. Actions speak louder than", "earend"),
        ("The early *bird* catches the", "brid"),
        ("Don't count your *chickens* before they", "chikens"),
        ("Every *cloud* has a silver", "clowd"),
        ("Better *late* than", "laet"),
        ("When in *Rome*, do as the", "Roem"),
        ("All that *glitters* is not", "gliters"),
        ("The pen is *mightier* than the", "mightyer"),
        ("Actions *speak* louder than", "speek"),
        ("Curiosity *killed* the", "kiled"),
        ("Don't put all your *eggs* in one", "egss"),
    ],
    "body": [
        ("We see with our *eyes* and hear with our", "eyse"),
        ("The *heart* pumps", "haert"),
        ("We breathe with our *lungs* and think with our", "lugns"),
        ("We *walk* on our two", "wlak"),
        ("You *smell* with your", "smel"),
        ("The *skeleton* is made of", "skeleten"),
        ("We chew food with our *teeth* and taste it with our", "teath"),
        ("Each *hand* has five", "hnad"),
        ("The *stomach* digests", "stomache"),
        ("We wear *gloves* on our", "glvoes"),
        ("The *brain* is protected by the", "brian"),
    ],
    "animals": [
        ("A *cow* says", "cwo"),
        ("The *elephant* has a long", "elefant"),
        ("A baby *dog* is called a", "dgo"),
        ("The *lion* is known as the king of the", "loin"),
        ("A *spider* has eight", "spdier"),
        ("Fish *swim* in the", "swimm"),
        ("A baby *cat* is called a", "cta"),
        ("The *giraffe* has a very long", "girafe"),
        ("Bees make *honey* and cows make", "hony"),
        ("A *kangaroo* carries its baby in a", "kangeroo"),
        ("The *penguin* is a bird that cannot", "pengiun"),
    ],
    "counting": [
        ("One, two, three, *four*,", "fuor"),
        ("Monday, *Tuesday*,", "Tuseday"),
        ("January, *February*, March,", "Febuary"),
        ("First, *second*,", "secnod"),
        ("Ten, twenty, *thirty*,", "thrity"),
        ("*Seven*, eight, nine,", "Sevne"),
        ("Five, *six*, seven, eight,", "sxi"),
        ("Two, four, *six*, eight,", "sixx"),
        ("One hundred, two *hundred*, three", "hunderd"),
        ("Spring, *summer*, autumn,", "sumer"),
        ("Once, *twice*,", "twcie"),
    ],
    "syntax": [
        ("She *opened* the door and", "opend"),
        ("If it rains *tomorrow*, we will", "tommorow"),
        ("The *children* were playing in the", "childern"),
        ("He *walked* to the store because", "walekd"),
        ("I *believe* that the answer is", "beleive"),
        ("They *would* have come if they", "woudl"),
        ("The book that I *bought* yesterday was", "bougth"),
        ("Although it was *raining*, we", "rainnig"),
        ("Not only is she *clever*, but she is also", "clevr"),
        ("The *reason* why I left is", "reaosn"),
        ("Neither the teacher nor the *students*", "studetns"),
    ],
    "misc": [
        ("The *internet* was invented in the", "internt"),
        ("Water *boils* at one hundred degrees", "bolis"),
        ("The *sun* rises in the", "snu"),
        ("A *computer* runs programs written in", "computr"),
        ("To make *bread* you need flour, water and", "braed"),
        ("The *library* is a place where you can borrow", "libary"),
        ("Ice is *frozen*", "frozne"),
        ("The *government* of a country makes", "goverment"),
        ("An *umbrella* keeps you", "umbrela"),
        ("The *restaurant* served", "restaraunt"),
        ("We read the *newspaper* every", "newpaper"),
    ],
    "people": [
        ("William *Shakespeare* wrote", "Shakespear"),
        ("Albert *Einstein* was a famous", "Einstien"),
        ("Isaac *Newton* discovered the law of", "Newotn"),
        ("Abraham *Lincoln* was the president of the", "Lincon"),
        ("Charles *Darwin* is known for the theory of", "Drawin"),
        ("The *president* of the United States lives in the", "presidnet"),
        ("Napoleon was an *emperor* of", "emporer"),
        ("A *doctor* works in a", "docotr"),
        ("Queen *Victoria* ruled the United", "Victora"),
        ("The *teacher* wrote on the", "teahcer"),
        ("Leonardo da *Vinci* painted the", "Vinic"),
    ],
}


def osa(a, b):
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


rev = defaultdict(list)
for line in open(sys.argv[1]):
    wrong, right = line.rstrip("\n").split("->", 1)
    for r in right.split(","):
        r = r.strip()
        if r:
            rev[r].append(wrong)

out = []
for cat, items in PROMPTS.items():
    for clean, hand in items:
        if hand is None:
            continue
        start, end = clean.index("*"), clean.index("*", clean.index("*") + 1)
        word = clean[start + 1 : end]
        plain = clean.replace("*", "")
        cands = [w for w in rev.get(word.lower(), []) if 1 <= osa(w, word.lower()) <= 2 and w.isalpha()]
        if word[0].isupper():
            cands = [c[0].upper() + c[1:] for c in cands]
        if cands:
            typo_word, source = (
                sorted(cands, key=lambda c: (c[0].lower() != word[0].lower(), osa(c.lower(), word.lower()), c))[0],
                "codespell-2.4.3",
            )
        else:
            typo_word, source = hand, "hand"
        assert 1 <= osa(typo_word, word) <= 2, (word, typo_word)
        typo = plain[:start] + typo_word + plain[start + len(word) :]
        assert typo != plain
        out.append(
            {"category": cat, "clean": plain, "typo": typo, "word": word, "typo_word": typo_word, "source": source}
        )
for r in out:
    print(json.dumps(r))
