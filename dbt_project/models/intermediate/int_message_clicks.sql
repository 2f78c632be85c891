-- Clicks per message: how many, the first and the last.

with

clicks as (

    select * from {{ ref('stg_ops__clicks') }}

),

final as (

    select
        message_id,
        count(*) as clicks,
        min(clicked_at) as first_clicked_at,
        max(clicked_at) as last_clicked_at
    from clicks
    group by 1

)

select * from final
